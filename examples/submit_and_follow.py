"""Submit a job to gpufleet and follow its events until it ends.

pip install nats-py msgpack; GPUFLEET_NATS_URL=nats://... python3 submit_and_follow.py [JOB.json]
"""
import asyncio, json, os, sys

import msgpack, nats
from nats.js.api import DeliverPolicy

JOB = {"name": "python-demo", "tasks": [
    {"name": "train", "resources": {"gpus": 1, "gpu_memory": "4GiB"},
     "command": ["python3", "-c", "import json, os\n"
                 "for step in range(3):\n"
                 "    print('step', step, flush=True)\n"
                 "    print(json.dumps({'step': step}), file=open(os.environ['GPUFLEET_EVENTS'], 'a'))\n"
                 "json.dump({'accuracy': 0.9}, open(os.environ['GPUFLEET_RESULT'], 'w'))"]},
    {"name": "evaluate", "resources": {"gpu_memory": "2GiB", "cpus": 0.5},
     "command": ["sh", "-c", "echo evaluating on GPU [$CUDA_VISIBLE_DEVICES]"]}]}


async def api(nc, verb, body):
    """One request to the gpufleet API, in JSON."""
    reply = await nc.request(f"gpufleet.api.{verb}", json.dumps(body).encode(), timeout=10,
                             headers={"Content-Type": "application/json"})
    if reply.headers and "Nats-Service-Error-Code" in reply.headers:
        raise RuntimeError(f"{verb}: {json.loads(reply.data)['error']}")
    return json.loads(reply.data)


async def main():
    nc = await nats.connect(os.environ.get("GPUFLEET_NATS_URL", "nats://127.0.0.1:4222"))
    js = nc.jetstream()
    job = json.load(open(sys.argv[1])) if len(sys.argv) > 1 else JOB
    job_id = (await api(nc, "jobs.submit", job))["job_id"]
    status = await api(nc, "jobs.get", {"job_id": job_id})
    names = {t["task_id"]: t["name"] for t in status["tasks"]}
    print("submitted job", job_id, file=sys.stderr)

    # Every event of the job from the start of the stream, then live ones,
    # on gpufleet.events.<owner>.<job>.<task>.<kind>.<sender>.
    subject = f"gpufleet.events.{status['owner']}.{job_id}.>"
    holders = {}  # (task, attempt) -> the worker whose output counts
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    seen, last = 0, None
    while True:
        if status["status"].startswith("FINISHED") or status["status"] == "FAILED_TO_RUN":
            # The job publishes nothing more: read up to its newest event.
            last = last or (await js.get_last_msg("GPUFLEET_EVENTS", subject)).seq
            if seen >= last:
                break
        try:
            msg = await sub.next_msg(timeout=2)
        except nats.errors.TimeoutError:
            status = await api(nc, "jobs.get", {"job_id": job_id})
            continue
        seen = msg.metadata.sequence.stream
        event = msgpack.unpackb(msg.data)
        body, who = event["body"], f"[{names.get(event['task_id'], event['task_id'])}]"
        # The coordinator (sender "_c") says who holds each attempt; count
        # a worker's events only for attempts it holds.
        sender, attempt = msg.subject.split(".")[-1], (event["task_id"], event["attempt"])
        if sender == "_c" and body.get("holder"):
            holders[attempt] = body["holder"]
        elif sender != "_c" and holders.get(attempt) != sender:
            continue
        if body["kind"] == "log":
            out = sys.stdout if body["stream"] == "stdout" else sys.stderr
            for line in body["text"].splitlines():
                print(who, line, file=out)
        elif body["kind"] == "progress":
            print(who, "progress:", json.dumps(body["data"]), file=sys.stderr)
        elif body["kind"] == "result":
            print(who, "result:", body["state"], json.dumps(body["result"]), file=sys.stderr)
        elif body["kind"] == "state":
            print(who, body["state"], event.get("worker") or "", file=sys.stderr)
        if body["kind"] in ("state", "result"):
            # A success has no state event: its holder's result says it,
            # and jobs.get (the authority) says so once the record has it.
            status = await api(nc, "jobs.get", {"job_id": job_id})
    await nc.close()
    print("job", job_id, status["status"], file=sys.stderr)
    return 0 if status["status"] == "FINISHED:COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
