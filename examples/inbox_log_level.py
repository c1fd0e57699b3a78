"""A gpufleet task that follows its inbox: `gpufleet send JOB --topic log_level DEBUG`
changes its logging while it runs, and `--topic stop` ends it.

Submit it as a task's command, e.g. ["python3", "examples/inbox_log_level.py"].
The worker appends one JSON line per message to the file $GPUFLEET_INBOX
({"at", "from", "topic", "data"}); the file appears with the first message.
A sender may add --signal: the task then gets SIGUSR1 once the line is there,
which this task takes as "look now" (blocked, and waited for, so it never ends
the process).
"""
import json
import logging
import os
import signal
import sys

logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                    format="%(levelname)s %(message)s")
log = logging.getLogger("task")
INBOX = os.environ["GPUFLEET_INBOX"]
offset = 0  # how much of the inbox has been read


def new_messages():
    """The messages appended since the last call (whole lines only)."""
    global offset
    try:
        with open(INBOX, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:  # no message yet
        return []
    whole = data[:data.rfind(b"\n") + 1]
    offset += len(whole)
    return [json.loads(line) for line in whole.splitlines() if line.strip()]


signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
step = 0
while True:
    for m in new_messages():
        if m["topic"] == "log_level":  # the convention: data is a level name
            logging.getLogger().setLevel(str(m["data"]).upper())
            log.warning("log level now %s (from %s)", m["data"], m["from"])
        elif m["topic"] == "stop":
            log.info("stopping at step %d", step)
            sys.exit(0)
        else:
            log.info("message %s from %s: %s", m["topic"], m["from"], json.dumps(m["data"]))
    log.debug("step %d", step)
    if step % 20 == 0:
        log.info("step %d", step)
    step += 1
    # Work would go here; wait a little, or until a --signal says "look now".
    signal.sigtimedwait({signal.SIGUSR1}, 0.1)
