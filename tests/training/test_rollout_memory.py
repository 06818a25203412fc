"""Training memory lent to the rollout (avsd_megatron/training/rollout_memory.py) and the DDP switches, on real
Megatron-Core over 2 gloo ranks (DP2, distributed optimizer, 2 micro-batches per rank, the bundled tiny Qwen3).

One launch trains 2 steps from the same converted weights under four configs in a fresh Trainer each:
reference (parallel.overlap_grad_reduce=false, no offload), overlap on, grad-buffer offload on, both offloads on.
Losses, grad norms and the final parameters must be bit-identical to the reference: the offload only frees storage
the next step zeroes anyway, and overlapped bucket reductions are the same reductions started earlier. With overlap
the schedule must hold DDP's `no_sync`. During every offloaded rollout the grad buffers' storage must really be
empty (and in the others, allocated), and so must they be while the engine is built (vLLM sizes its budget from the
memory free at start-up). On CPU megatron-core's optimizer
offload moves only CUDA tensors, so that part is a no-op here; `benchmarks/gpu_step.py` checks it on a GPU.

Run: python -m pytest -q tests/training/test_rollout_memory.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avsd_megatron.testing import run_on_ranks
from avsd_megatron.training.config import from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
VARIANTS = {
    "reference": {"parallel": {"overlap_grad_reduce": False},
                  "memory": {"offload_grad_buffers": False, "offload_optimizer_states": False}},
    "overlap": {"parallel": {"overlap_grad_reduce": True},
                "memory": {"offload_grad_buffers": False, "offload_optimizer_states": False}},
    "offload_grads": {"parallel": {"overlap_grad_reduce": True},
                      "memory": {"offload_grad_buffers": True, "offload_optimizer_states": False}},
    "offload_all": {"parallel": {"overlap_grad_reduce": False},
                    "memory": {"offload_grad_buffers": True, "offload_optimizer_states": True}},
}


def variants_rank(cfg_datas: dict[str, dict]) -> dict[str, dict]:
    """Each variant: a fresh Trainer, 2 steps; the metrics, the gathered final parameters and the grad-buffer
    storage sizes seen by the engine during each rollout."""
    import avsd_megatron.training.trainer as trainer_module
    from avsd_megatron.runtime import install
    from avsd_megatron.testing.full_state import gather_full_state
    from avsd_megatron.training.trainer import Trainer

    install()
    out = {}
    build_hf = trainer_module.ENGINES["hf"]
    for name, data in cfg_datas.items():
        at_build = []

        def recording_build(cfg, *, on_cpu, _at_build=at_build):
            import inspect

            building = inspect.currentframe().f_back.f_locals["self"]  # the Trainer whose __init__ builds the engine
            _at_build.append(sum(b.grad_data.untyped_storage().size() for b in building.model.buffers))
            return build_hf(cfg, on_cpu=on_cpu)

        trainer_module.ENGINES["hf"] = recording_build
        try:
            trainer = Trainer(from_dict(data), progress=False)
        finally:
            trainer_module.ENGINES["hf"] = build_hf
        seen = []
        generate = trainer.engine.generate

        def recording(*args, _generate=generate, _trainer=trainer, _seen=seen, **kwargs):
            _seen.append(sum(b.grad_data.untyped_storage().size() for b in _trainer.model.buffers))
            return _generate(*args, **kwargs)

        trainer.engine.generate = recording
        config = trainer.model.config
        assert (config.no_sync_func == trainer.model.no_sync) == trainer.cfg.parallel.overlap_grad_reduce, name
        metrics = [trainer.train_step() for _ in range(2)]
        full = gather_full_state(trainer.model)
        buffer_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for b in trainer.model.buffers)
        out[name] = {"metrics": [{k: m[k] for k in ("loss", "grad_norm", "num_tokens")} for m in metrics],
                     "params": full, "storage_during_rollout": seen, "buffer_bytes": buffer_bytes,
                     "storage_at_engine_build": at_build}
    return out


@pytest.mark.integration
def test_offload_and_overlap_leave_the_step_bit_identical(tmp_path):
    from avsd_megatron.convert import convert_hf_to_megatron
    from avsd_megatron.data.tiny import make_tiny_hf_checkpoint

    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf")
    ckpt = tmp_path / "mcore"
    convert_hf_to_megatron(hf_dir, ckpt, dtype=torch.float32)
    datas = {}
    for name, sections in VARIANTS.items():
        data = to_dict(load_config(TINY_YAML))
        data.update(output_dir=str(tmp_path / name), prompts_per_step=4, micro_batch_size=1, max_steps=2)
        data["model"].update(hf_path=str(hf_dir), megatron_checkpoint=str(ckpt))
        data["rollout"]["max_new_tokens"] = 6
        data["optim"]["distributed_optimizer"] = True
        data["checkpoint"].update(save_every=0, resume=None)
        for section, values in sections.items():
            data[section].update(values)
        datas[name] = data
    ranks = run_on_ranks(variants_rank, 2, datas, timeout=600)
    for rank in ranks:
        ref = rank["reference"]
        assert ref["storage_during_rollout"] == [ref["buffer_bytes"]] * 2 and ref["buffer_bytes"] > 0
        for name in ("overlap", "offload_grads", "offload_all"):
            got = rank[name]
            assert got["metrics"] == ref["metrics"], (name, got["metrics"], ref["metrics"])
            assert got["params"].keys() == ref["params"].keys()
            for key, value in ref["params"].items():
                assert torch.equal(got["params"][key], value), (name, key)
        assert ref["storage_at_engine_build"] == [ref["buffer_bytes"]]
        assert rank["offload_grads"]["storage_at_engine_build"] == [0]  # the engine is sized with them freed
        assert rank["offload_grads"]["storage_during_rollout"] == [0, 0]
        assert rank["offload_all"]["storage_during_rollout"] == [0, 0]
        assert rank["overlap"]["storage_during_rollout"] == [ref["buffer_bytes"]] * 2
