# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Runs a training script with Accelerate's FSDP or DeepSpeed on CPU processes (gloo): `python sharded_on_cpu.py SCRIPT
ARGS...`, started by `accelerate launch --config_file examples/accelerate_configs/<fsdp|deepspeed_zero2>.yaml` in
place of the script.

Accelerate refuses both engines on CPUs in one place, `AcceleratorState.__init__`:
- FSDP: the plugin becomes `DistributedType.FSDP` inside a branch taken for GPU-like process groups (MULTI_GPU,
  MULTI_XPU, ...), which a CPU process group (MULTI_CPU, gloo) never enters;
- DeepSpeed: its branch requires `cpu=False`, which a machine without GPUs cannot give (with `cpu=False` Accelerate
  finds no device backend and runs a single process).
So the plugin is dropped and the run is plain CPU DDP. PyTorch's `fully_shard` and DeepSpeed's CPU accelerator
(`DS_ACCELERATOR=cpu`, gloo) both run on CPU tensors. This file does, after Accelerate set up the gloo process group,
what the skipped branch does (the distributed type, the plugin and its mixed precision; for DeepSpeed also its
communication layer on the same process group), then runs the script unchanged: everything after it
(`Accelerator.prepare`, `save_state` / `load_state`, `get_state_dict`, and the training code of diffusers-pixnerd)
is the code a GPU run executes.
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerate_init = AcceleratorState.__init__


def _init_on_cpu(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
    _accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
    elif deepspeed_plugin is not None:
        from deepspeed import comm

        comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # wraps the existing process group
        self.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin
        self._mixed_precision = "no"  # DeepSpeed runs the mixed precision of its config
    else:
        return
    PartialState._shared_state["distributed_type"] = self.distributed_type


if __name__ == "__main__":
    AcceleratorState.__init__ = _init_on_cpu
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
    if AcceleratorState._shared_state.get("distributed_type") == DistributedType.DEEPSPEED:
        # The script returned (trained, saved, exported, ended the process group). DeepSpeed's CPU communication
        # layer once aborted a process in the interpreter's teardown after that (CI: SIGABRT, "terminate called
        # without an active exception", everything written; not reproduced in 5 local runs): end here without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
