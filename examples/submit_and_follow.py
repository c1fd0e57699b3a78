#!/usr/bin/env python3
"""Submit a job to gpufleet and follow its events, from Python.

    pip install -r examples/requirements.txt     # nats-py and msgpack
    python3 examples/submit_and_follow.py [--nats-url URL] [JOB.json]

Without a job file it submits a small two-task job. It prints every event
of the job as it comes (state changes, output, progress, results), stops
once the job has finished and every event of it has been seen, and exits 0
if the job completed, 1 otherwise.

Only the public contract is used: the `gpufleet.api.*` request subjects
(JSON here; MessagePack works too) and the `GPUFLEET_EVENTS` stream, whose
messages are MessagePack with named fields.
"""

import argparse
import asyncio
import json
import os
import sys

import msgpack
import nats
from nats.js.api import DeliverPolicy

DEMO_JOB = {
    "name": "python-demo",
    "tasks": [
        {
            "name": "train",
            "command": [
                "python3", "-c",
                "import json, os\n"
                "for step in range(3):\n"
                "    print('step', step, flush=True)\n"
                "    with open(os.environ['GPUFLEET_EVENTS'], 'a') as f:\n"
                "        f.write(json.dumps({'step': step, 'loss': 1 / (step + 1)}) + '\\n')\n"
                "json.dump({'accuracy': 0.9}, open(os.environ['GPUFLEET_RESULT'], 'w'))\n",
            ],
            "resources": {"gpus": 1, "gpu_memory": "4GiB", "cpus": 0.5},
        },
        {
            "name": "evaluate",
            "command": ["sh", "-c", "echo evaluating on GPU [$CUDA_VISIBLE_DEVICES]"],
            "resources": {"gpus": 0, "gpu_memory": "2GiB", "cpus": 0.5},
        },
    ],
}

FINISHED = ("FINISHED:COMPLETED", "FINISHED:ABORTED",
            "FINISHED:EXECUTION_EXCEPTION", "FAILED_TO_RUN")


async def call(nc, subject, body):
    """A JSON request to the gpufleet API; raises on an error reply."""
    reply = await nc.request(subject, json.dumps(body).encode(), timeout=10,
                             headers={"Content-Type": "application/json"})
    if reply.headers and "Nats-Service-Error-Code" in reply.headers:
        code = reply.headers["Nats-Service-Error-Code"]
        raise RuntimeError(f"{subject}: {code} {json.loads(reply.data)['error']}")
    return json.loads(reply.data)


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default=os.environ.get(
        "GPUFLEET_NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("job", nargs="?", help="a job file in JSON")
    args = parser.parse_args()
    job = json.load(open(args.job)) if args.job else DEMO_JOB

    nc = await nats.connect(args.nats_url)
    js = nc.jetstream()

    submitted = await call(nc, "gpufleet.api.jobs.submit", job)
    job_id = submitted["job_id"]
    print(f"submitted job {job_id}", file=sys.stderr)
    status = await call(nc, "gpufleet.api.jobs.get", {"job_id": job_id})
    names = {t["task_id"]: t["name"] for t in status["tasks"]}

    # Every event of the job, replayed from the start of the stream (so
    # nothing is missed however late we subscribe), then live ones.
    subject = f"gpufleet.events.{job_id}.>"
    sub = await js.subscribe(subject, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)
    last_seen = 0   # stream sequence of the last event we handled
    tail = None     # the job's newest stored event, once it has finished
    while True:
        if status["status"] in FINISHED:
            # Everything the job will ever publish is stored by now: read
            # up to its newest event, so that no last line is lost.
            if tail is None:
                tail = (await js.get_last_msg("GPUFLEET_EVENTS", subject)).seq
            if last_seen >= tail:
                break
        try:
            msg = await sub.next_msg(timeout=2)
        except nats.errors.TimeoutError:
            # A safety net: re-read the status now and then.
            status = await call(nc, "gpufleet.api.jobs.get", {"job_id": job_id})
            continue
        last_seen = msg.metadata.sequence.stream
        event = msgpack.unpackb(msg.data)
        body = event["body"]
        who = f"[{names.get(event['task_id'], event['task_id'])}]"
        kind = body["kind"]
        if kind == "log":
            out = sys.stdout if body["stream"] == "stdout" else sys.stderr
            for line in body["text"].splitlines():
                print(who, line, file=out)
        elif kind == "progress":
            print(who, "progress:", json.dumps(body["data"]), file=sys.stderr)
        elif kind == "result":
            print(who, "result:", body["state"], json.dumps(body.get("result")),
                  file=sys.stderr)
        elif kind == "state":
            where = f" on {event['worker']}" if event.get("worker") else ""
            print(who, body["state"] + where, file=sys.stderr)
            status = await call(nc, "gpufleet.api.jobs.get", {"job_id": job_id})

    await sub.unsubscribe()
    await nc.close()
    print(f"job {job_id}: {status['status']}", file=sys.stderr)
    for t in status["tasks"]:
        print(f"  {t['name']}: {t['state']} exit={t['exit_code']} result={json.dumps(t['result'])}",
              file=sys.stderr)
    return 0 if status["status"] == "FINISHED:COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
