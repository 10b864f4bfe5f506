"""hypermoe.parallel: the expert-parallel layer against the single-process HyperMoELayer (the oracle), on CPU
with gloo, in spawned processes (a FileStore rendezvous: no ports; a timeout on every collective and on the
join, so a hung collective fails the test instead of CI).

Equivalence: the ranks' batches (uneven, one rank with no tokens) are slices of one union batch; the single
process runs the union. Routing (selected, kept) is compared exactly (inputs drawn with a routing margin,
tests/strategies.py); values with the reorder bound of test_layer.py: the same sums in another order
(REORDER_K · u · S, S the magnitude of what is compared: layer_magnitude for outputs, the reference gradient's
magnitude ×4 for gradients — backward has twice the stages, as test_layer.py — and max(1, |aux|) for the aux
losses, sums over ≤ 40 tokens). Float64 throughout; every draw seeded.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ref
from tests.strategies import U64, inputs_with_margin, layer_magnitude, magnitude, reorder_atol

JOIN_TIMEOUT_S = 120  # the whole spawned job; each test takes a few seconds
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
AUX_COEF = {"switch_balance": 0.3, "z_loss": 0.2, "cv_balance": 0.1}  # all three aux losses reach the loss

CONFIGS = {
    "k=1": ref.tiny_config(n_experts=4, top_k=1),
    "k=2": ref.tiny_config(n_experts=4, top_k=2),
    "k=1 capacity": ref.tiny_config(n_experts=4, top_k=1, gate="switch", capacity=2),
    "k=2 N=8 plain MoE": ref.tiny_config(n_experts=8, top_k=2, hyper_expert=False),
}
SEQUENCES = {1: [3], 2: [3, 1], 4: [2, 0, 3, 1]}  # sequences per rank: uneven, and rank 1 of 4 has no tokens
SEQ_LEN = 6


def spawn(fn, world: int, tmp_path: Path, *args) -> None:
    """Run fn(rank, world, store_file, *args) in `world` spawned processes; raise if any fails or hangs."""
    store = tmp_path / "store"
    ctx = mp.start_processes(fn, args=(world, str(store), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.01)):  # False until every rank is joined
            if time.monotonic() > deadline:
                raise TimeoutError(f"spawned job of {world} ranks did not finish in {JOIN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def _init(rank: int, world: int, store: str, device: str = "cpu") -> None:
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)


@contextlib.contextmanager
def _job(rank: int, world: int, store: str, device: str = "cpu"):
    """A spawned rank's process group around the work. On success: a barrier (no rank tears down while another
    is still in a collective), destroy_process_group, then os._exit(0), skipping the interpreter's and torch's
    C++ teardown: in one full-suite run of 20+, a rank that had finished its work died there with "terminate
    called without an active exception" (SIGABRT; not reproduced in 24 reruns of the test alone). A failure
    inside the work still raises, so spawn reports it with its traceback."""
    _init(rank, world, store, device)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def equivalence(cfg, world: int, rank: int, seed: int = 0, device: str = "cpu",
                expert_parallel: int | None = None) -> dict[str, tuple[float, float]]:
    """Run the layer on this rank's slice and the single-process layer on the union; assert equality and
    return {quantity: (max abs error, bound)} for this rank. `expert_parallel` E < world: experts sharded over
    groups of E ranks (a (replica, expert) mesh), shards' gradients summed over their replicas."""
    from hypermoe.layer import HyperMoELayer
    from hypermoe.parallel import ExpertParallelHyperMoE, expert_mesh, sync_gradients

    group = replicas = None
    if expert_parallel is not None:
        mesh = expert_mesh(expert_parallel, device)
        group, replicas = mesh["expert"].get_group(), mesh["replica"].get_group()

    counts = SEQUENCES[world]
    rng = np.random.default_rng(seed)
    params = ref.init(cfg, seed=seed)
    x_np = inputs_with_margin(cfg, params, (sum(counts), SEQ_LEN, cfg.d_model), rng, 1e-3)
    x_all = torch.tensor(x_np, device=device)
    weight = torch.tensor(rng.standard_normal(x_all.shape), device=device)  # a real output gradient
    layer_index = 1

    def loss(out, w):
        return (out.output * w).sum() + sum(AUX_COEF[name] * value for name, value in out.aux.items())

    single = HyperMoELayer.from_ref(cfg, params, dtype=torch.float64, device=device).train()
    x_ref = x_all.clone().requires_grad_(True)
    ref_out = single(x_ref, layer_index)
    loss(ref_out, weight).backward()

    twin = HyperMoELayer.from_ref(cfg, params, dtype=torch.float64, device=device).train()
    ep = ExpertParallelHyperMoE.from_layer(twin, group)
    ep.zero_grad(set_to_none=True)
    start = sum(counts[:rank])
    rows = slice(start, start + counts[rank])  # this rank's sequences of the union
    x = x_all[rows].clone().requires_grad_(True)
    out = ep(x, layer_index)
    loss(out, weight[rows]).backward()
    sync_gradients(ep, replica_group=replicas)

    assert torch.equal(out.routing.selected, ref_out.routing.selected[rows]), "selected"
    assert torch.equal(out.routing.kept, ref_out.routing.kept[rows]), "kept"
    if cfg.capacity is not None and rank == 0:
        assert not ref_out.routing.kept.all(), "the capacity case must drop tokens"
    errors: dict[str, tuple[float, float]] = {}

    def check(name, got, want, bound):
        err = (got.detach() - want.detach()).abs().max().item() if want.numel() else 0.0
        assert err <= bound, f"{name}: |error| {err:.3e} > bound {bound:.3e} (rank {rank} of {world})"
        previous = errors.get(name.split(" ")[0], (0.0, bound))
        errors[name.split(" ")[0]] = max(previous, (err, bound), key=lambda eb: eb[0] / eb[1])

    S = layer_magnitude(cfg, params, x_np, layer_index)
    check("output", out.output, ref_out.output[rows], reorder_atol(S))
    for name in out.aux:
        check(f"aux {name}", out.aux[name], ref_out.aux[name], reorder_atol(magnitude(ref_out.aux[name])))
    check("grad x", x.grad, x_ref.grad[rows], reorder_atol(4 * magnitude(x_ref.grad)))
    lo, hi = ep.expert_offset, ep.expert_offset + ep.n_local
    reference = dict(single.named_parameters())
    for name, p in ep.named_parameters():
        want = reference[name].grad
        want = want[lo:hi] if name.startswith("experts.") else want
        check(f"grad {name}", p.grad, want, reorder_atol(4 * magnitude(want)))
    return errors


def _equivalence_worker(rank: int, world: int, store: str, out_dir: str, device: str = "cpu") -> None:
    with _job(rank, world, store, device):
        results = {name: equivalence(cfg, world, rank, device=device) for name, cfg in CONFIGS.items()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_layer_equals_single_process(world, tmp_path):
    """Outputs, aux losses, the input's and every parameter's gradient (expert shards: their rows) equal the
    single-process layer's on the union of the ranks' batches; k = 1, 2, capacity, a plain MoE; uneven
    batches and (world 4) a rank with no tokens."""
    spawn(_equivalence_worker, world, tmp_path, str(tmp_path))
    for rank in range(world):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(results) == set(CONFIGS)
        for errors in results.values():
            assert all(err <= bound for err, bound in errors.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("world", [1, 2, 4])
def test_expert_parallel_layer_nccl(world, tmp_path):
    """The same equivalence on NCCL, one GPU per rank (as many ranks as GPUs allow)."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, {torch.cuda.device_count()} present")
    spawn(_equivalence_worker, world, tmp_path, str(tmp_path), "cuda")
    for rank in range(world):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(results) == set(CONFIGS)


def _groups_worker(rank: int, world: int, store: str) -> None:
    with _job(rank, world, store):
        for name in ("k=2", "k=1 capacity"):
            equivalence(CONFIGS[name], world, rank, expert_parallel=2)


def test_expert_parallel_groups_of_2_in_4_ranks(tmp_path):
    """4 ranks as 2 replicas of 2-rank expert groups (the mesh `hypermoe train --expert-parallel 2` builds on 4
    processes): the same equivalence, the expert shards' gradients summed over their replicas."""
    spawn(_groups_worker, 4, tmp_path)


def _errors_worker(rank: int, world: int, store: str) -> None:
    from hypermoe.layer import HyperMoELayer
    from hypermoe.parallel import ExpertParallelHyperMoE

    with _job(rank, world, store):
        with pytest.raises(ValueError, match="not divisible by the expert-parallel group size 2"):
            ExpertParallelHyperMoE(ref.tiny_config(n_experts=5, top_k=1))
        layer = ExpertParallelHyperMoE.from_layer(HyperMoELayer(ref.tiny_config()))
        with pytest.raises(ValueError, match="holds a shard"):
            layer.load_ref(ref.init(ref.tiny_config()))


def test_expert_parallel_refusals(tmp_path, monkeypatch):
    """One-line ValueErrors: N not divisible by the group size; a shard asked to load full parameters; no
    torch.distributed; expert parallelism outside torchrun."""
    from hypermoe.parallel import ExpertParallelHyperMoE, init_distributed

    spawn(_errors_worker, 2, tmp_path)
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        ExpertParallelHyperMoE(ref.tiny_config())
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="needs torchrun"):
        init_distributed()


# ---------------------------------------------------------------------------------------------
# Training under torchrun, sharded checkpoints
# ---------------------------------------------------------------------------------------------

TORCHRUN_TIMEOUT_S = 180
CLI = "import sys; from hypermoe.cli import main; sys.exit(main())"
TRAIN = ["--config", "tiny", "--batch-size", "4", "--seq-len", "16", "--lr", "3e-3", "--min-lr", "3e-4",
         "--warmup-steps", "2", "--eval-every", "2", "--eval-tokens", "256", "--checkpoint-every", "2",
         "--log-every", "1", "--threads", "1", "--quiet"]


def torchrun(nproc: int, *args: str) -> None:
    """hypermoe on `nproc` processes under torchrun (--standalone: a free port of its own choosing)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--no-python", sys.executable, "-c", CLI, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 GPUs (scripts/gpu_check.sh runs it)"))])
def test_train_under_torchrun_equals_single_process_and_resumes(device, tmp_path):
    """`hypermoe train --expert-parallel 2` on 2 processes against the single-process run of the same config:
    float32, so the forward differs by GEMM shapes and summation order only; step 1 (before any update) within
    1e-5 relative (a few ulp (6e-8) per stage over ~20 stages, ×8 margin), later steps within 1e-4 (AdamW turns
    those differences into ≤ lr-sized parameter changes; routing is checked not to flip: the logged expert
    fractions are equal). A run resumed from its step-2 checkpoint logs the uninterrupted run's losses bitwise.
    The sharded checkpoint converts to a model directory (whose validation loss is the run's) and back. On CUDA
    (NCCL) the resumed run is compared like the single-process one: CUDA's index_select backward accumulates
    with atomics, so two runs are not bitwise equal there."""
    import ref.io
    from hypermoe import parallel
    from hypermoe.model import HyperMoETransformer
    from hypermoe.train import TrainConfig, evaluate, open_corpus, read_log, train
    from tests.test_train import write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    common = [*TRAIN, "--data", str(corpus), "--expert-parallel", "2", "--device", device]
    torchrun(2, "train", *common, "--steps", "4", "--out", str(tmp_path / "ep"))
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "ep" / "train.json").read_text()))
    assert cfg.expert_parallel == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg.replace(expert_parallel=1), tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(threads)
    ep, single = read_log(tmp_path / "ep"), read_log(tmp_path / "single")
    assert [r["step"] for r in ep] == [r["step"] for r in single]
    losses = [(a["loss"], b["loss"]) for a, b in zip(ep, single) if "loss" in a]
    assert abs(losses[0][0] - losses[0][1]) <= 1e-5 * abs(losses[0][1])
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in losses)
    for a, b in zip(ep, single):
        if "expert_fraction" in a:
            assert a["expert_fraction"] == b["expert_fraction"]  # the same routing decisions

    # resume: 2 steps, then on to 4 from the step-2 checkpoint
    torchrun(2, "train", *common, "--steps", "2", "--out", str(tmp_path / "resumed"))
    torchrun(2, "train", "--resume", str(tmp_path / "resumed"), "--steps", "4", "--threads", "1", "--quiet")
    trained = [(r["step"], r["loss"]) for r in read_log(tmp_path / "resumed") if "loss" in r]
    uninterrupted = [(r["step"], r["loss"]) for r in ep if "loss" in r]
    if device == "cpu":
        assert trained == uninterrupted
    else:
        assert all(a[0] == b[0] and abs(a[1] - b[1]) <= 1e-4 * abs(b[1]) for a, b in zip(trained, uninterrupted))

    # sharded checkpoint → model directory → sharded → model directory
    model_dir = parallel.to_model_dir(tmp_path / "ep" / "checkpoint" / "sharded", tmp_path / "model")
    model = HyperMoETransformer.from_dir(model_dir)
    assert model.blocks[0].moe.experts.w1.shape[0] == cfg.model.n_experts
    val = evaluate(cfg.replace(device="cpu"), model, open_corpus(corpus).val)["val_loss"]
    logged = [r["val_loss"] for r in ep if "val_loss" in r][-1]  # the distributed evaluation at step 4
    assert abs(val - logged) <= 1e-5 * val  # float32, as step 1 above
    with pytest.raises(ValueError, match="already exists"):
        parallel.to_model_dir(tmp_path / "ep" / "checkpoint" / "sharded", tmp_path / "model")
    parallel.from_model_dir(model_dir, tmp_path / "sharded")
    again = ref.io.load_dir(parallel.to_model_dir(tmp_path / "sharded", tmp_path / "model2"))[1]
    first = ref.io.load_dir(model_dir)[1]
    assert all(np.array_equal(first[name], again[name]) for name in first)
    # resuming outside torchrun, or as a single-process run, is refused with one line
    with pytest.raises(ValueError, match="needs torchrun"):
        train(cfg.replace(steps=5), tmp_path / "ep", resume=True, progress=False)
    with pytest.raises(ValueError, match="expert_parallel differ"):
        train(cfg.replace(expert_parallel=1, steps=5), tmp_path / "ep", resume=True, progress=False)


def _load_worker(rank: int, world: int, store: str, sharded: str, model_dir: str) -> None:
    from hypermoe.model import HyperMoETransformer
    from hypermoe.parallel import expert_mesh, expert_parallel_, load_sharded

    with _job(rank, world, store):
        full = HyperMoETransformer.from_dir(model_dir)
        model = expert_parallel_(HyperMoETransformer(full.config), group=None)
        mesh = expert_mesh(world)
        load_sharded(sharded, model, mesh)
        want = full.state_dict()
        for name, t in model.state_dict().items():
            if ".experts." in name:
                n = t.shape[0]
                assert torch.equal(t, want[name][rank * n:(rank + 1) * n]), name
            else:
                assert torch.equal(t, want[name]), name


def test_sharded_checkpoint_from_a_model_directory_loads_at_any_world_size(tmp_path):
    """from_model_dir (one process) → load_sharded on 4 ranks: each rank holds exactly its experts' rows and
    every replicated parameter (DCP reshards; nothing is unpickled but DCP's metadata classes)."""
    import ref.model
    from hypermoe import parallel

    cfg = ref.tiny_config(n_experts=4)
    params = {name: a.astype(np.float32) for name, a in ref.model.init_model(cfg, seed=3).items()}
    model_dir = ref.io.save_dir(tmp_path / "model", cfg, params, "model")
    parallel.from_model_dir(model_dir, tmp_path / "sharded")
    spawn(_load_worker, 4, tmp_path, str(tmp_path / "sharded"), str(model_dir))


def test_checkpoint_metadata_is_never_unpickled_beyond_dcp_classes(tmp_path):
    """A .metadata naming any other global (here os.system) is refused before anything runs."""
    import pickle

    from hypermoe.parallel import SafeFileSystemReader

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    tmp_path.joinpath(".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="names posix.system"):
        SafeFileSystemReader(tmp_path).read_metadata()


def test_checkpoint_command_refuses_what_is_no_sharded_checkpoint_or_no_model(tmp_path, capsys):
    """to-model on a single-process run (RUN/checkpoint/model, no DCP files) says it is not a sharded checkpoint and
    where its model directory is; from-model refuses a layer directory (a training checkpoint holds a model)."""
    import ref.io
    import ref.model
    from hypermoe.cli import main

    cfg = ref.tiny_config(n_experts=4)
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    ref.io.save_dir(run / "checkpoint" / "model", cfg, ref.model.init_model(cfg, seed=0), "model")
    for source in (run, run / "checkpoint"):
        assert main(["checkpoint", "to-model", str(source), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "no such file" not in err, err
        assert f"{source} is not a sharded checkpoint" in err and f"{run / 'checkpoint' / 'model'} already" in err
    ref.io.save_dir(tmp_path / "layer", cfg, ref.init(cfg, seed=0), "layer")
    assert main(["checkpoint", "from-model", str(tmp_path / "layer"), str(tmp_path / "sharded")]) == 2
    assert "a saved layer, not a model (kind 'model')" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "sharded").exists()
