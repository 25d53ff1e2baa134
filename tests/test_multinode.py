"""Several nodes as users launch them: torchrun with --nnodes 2 on this machine (node ranks 0 and 1
on 127.0.0.1, gloo) against one process at the same effective batch; and the SLURM job script of
docs/scale.md resolved from the variables SLURM sets, as Lightning reads them."""
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.config import apply_overrides, load_experiment, resolve
from experiments.distributed import world_size
from experiments.training import build_trainer, effective_batch, lr_scale
from tests.test_robustness import REPO, _parameters, saved_results, subprocess_env, tiny_command

NODE_ARGS = ("methods=[mib]", "data.batch_size=4", "schedule.step0={epochs: 2, lr: 0.01}",
             "schedule.incremental={epochs: 2, lr: 0.001}", "trainer.precision=32-true", "trainer.channels_last=false",
             "trainer.accelerator=cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_one_process_equal_one_process(tmp_path):
    """`torchrun --nnodes 2 --nproc_per_node 1 --node_rank {0,1} --master_addr 127.0.0.1` (two
    launchers, as on two machines, sharing the output directory as a cluster's file system), against
    1 process x 4 images x 2 accumulated batches: the same step-0 model (within float summation
    order, 1e-3 relative as the 2-process test) and final metrics within 3 points (per-process batch
    norm statistics on CPU; tests/test_robustness.py says why), one set of results."""
    data = tmp_path / "data"
    port = _free_port()
    env = dict(subprocess_env(), OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    run_args = tiny_command(tmp_path / "nodes", data, *NODE_ARGS, "trainer.devices=1", "trainer.num_nodes=2")[1:]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", *run_args],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "effective batch 8 = 2 process(es) x 4 images x 1 accumulation" in outputs[0].replace("\n", " ")
    one = subprocess.run(tiny_command(tmp_path / "one", data, *NODE_ARGS, "trainer.accumulate_grad_batches=2"),
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    (a_path,) = [p for p in (tmp_path / "one" / "cache").glob("step0-*.pt") if "." not in p.stem]
    (b_path,) = [p for p in (tmp_path / "nodes" / "cache").glob("step0-*.pt") if "." not in p.stem]
    assert a_path.name == b_path.name   # the cache key holds the effective batch, not the process layout
    a, b = _parameters(a_path), _parameters(b_path)
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    assert worst < 1e-3, worst
    single, multi = saved_results(tmp_path / "one", "mib"), saved_results(tmp_path / "nodes", "mib")
    assert multi["complete"] and multi["config"]["trainer"]["num_nodes"] == 2
    for key in ("old_no_bg", "new_no_bg", "all_with_bg"):
        assert abs(single["final"][key] - multi["final"][key]) <= 0.03, (key, single["final"][key], multi["final"][key])
    results = list((tmp_path / "nodes" / "runs").rglob("results.json"))
    assert len(results) == 1   # written once, by global rank 0


def slurm_job_script() -> tuple[dict, list[str]]:
    """The job script of docs/scale.md: its #SBATCH options and the arguments of experiments.run."""
    page = (REPO / "docs" / "scale.md").read_text()
    script = next(block for block in re.findall(r"```bash\n(.*?)```", page, re.S) if "#SBATCH" in block)
    options = dict(re.findall(r"--([a-z-]+)=(\S+)", next(line for line in script.splitlines() if line.startswith("#SBATCH"))))
    srun = shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))
    return options, srun[srun.index("experiments.run") + 1:]


@pytest.fixture
def isolated_process_state():
    """Lightning writes what it reads from SLURM into this process (MASTER_ADDR / MASTER_PORT in the
    environment, the rank of rank_zero_only): put both back, or later tests and the processes they
    start would look for gpu017, or think they are not rank 0."""
    from lightning_fabric.utilities import rank_zero as fabric_rank_zero
    from pytorch_lightning.utilities import rank_zero_only

    environment = dict(os.environ)
    ranks = (rank_zero_only.rank, fabric_rank_zero.rank_zero_only.rank)
    yield
    os.environ.clear()
    os.environ.update(environment)
    rank_zero_only.rank, fabric_rank_zero.rank_zero_only.rank = ranks


@pytest.mark.parametrize("node, local_rank", [(0, 0), (1, 1), (1, 3)])
def test_the_docs_slurm_script_resolves_ranks_world_size_and_batch(node, local_rank, monkeypatch, isolated_process_state):
    """What Lightning reads in the task at (node, local rank) of the script's allocation: SLURM's
    variables for that task (as srun sets them), the script's own arguments (on CPU here: GPUs are
    the only thing changed), the Trainer the step loop builds."""
    options, arguments = slurm_job_script()
    nodes, per_node = int(options["nodes"]), int(options["ntasks-per-node"])
    global_rank = node * per_node + local_rank
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_NAME", options["job-name"])
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", str(nodes * per_node))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", str(per_node))
    monkeypatch.setenv("SLURM_NNODES", str(nodes))
    monkeypatch.setenv("SLURM_NODELIST", "gpu[017-018]")
    monkeypatch.setenv("SLURM_PROCID", str(global_rank))
    monkeypatch.setenv("SLURM_LOCALID", str(local_rank))
    monkeypatch.setenv("SLURM_NODEID", str(node))
    experiment = resolve(apply_overrides(load_experiment(arguments[0]), [*arguments[1:], "trainer.accelerator=cpu"]))
    config = experiment.run_config("mib")
    trainer = build_trainer(config, epochs=1, logger=False, callbacks=[])
    environment = trainer.strategy.cluster_environment
    assert type(environment).__name__ == "SLURMEnvironment" and environment.main_address == "gpu017"
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (
        nodes * per_node, global_rank, local_rank, node)
    assert world_size(config.trainer) == nodes * per_node == 8
    assert effective_batch(config) == 24 == config.optimizer.reference_batch and lr_scale(config) == 1.0
