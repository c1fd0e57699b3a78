"""A gpufleet two-phase task: loads on the CPU, then trains on the GPU it is given."""
import json
import os
import time


def load():
    # Read and decode the data set, build the model: no GPU needed yet.
    time.sleep(1)
    return list(range(1000))


def wait_for_gpus(poll=0.1):
    """Says the task has loaded; returns its GPUs once the worker grants them."""
    path = os.environ["GPUFLEET_CONTROL"]
    with open(path, "a") as f:
        f.write("ready\n")
    while True:
        with open(path) as f:
            for line in f:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and "gpus" in msg:
                    return msg
        time.sleep(poll)


def train(data, grant):
    # Here: import torch; model.to("cuda:0"); ... CUDA sees the granted GPUs only.
    uuids = [g["uuid"] for g in grant["gpus"]]
    print(f"training on {len(data)} items, CUDA_VISIBLE_DEVICES="
          f"{os.environ['CUDA_VISIBLE_DEVICES']} ({', '.join(uuids)})")


data = load()
grant = wait_for_gpus()
# Before anything initialises CUDA (import torch, ...): it reads this once.
os.environ["CUDA_VISIBLE_DEVICES"] = grant["cuda_visible_devices"]
train(data, grant)
