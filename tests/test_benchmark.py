"""benchmarks/benchmark.py without measuring: its goal rows (ratios
against the original code's figures, whether each goal is met, what a
target asks of the machine the run measured) and its workers' environment.
"""

import json
import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
)
import benchmark  # noqa: E402

ANCHOR_MACHINE = {"matmul_gflops": 190.0, "copy_gbps": 25.0, "host": "test"}
DECODE_BYTES = 412e6


def generation(rows, tokens_per_s):
    return {
        "rows": rows,
        "new_tokens": 64,
        "step_seconds": rows / tokens_per_s,
        "decode_bytes": DECODE_BYTES,
        "ttft_seconds": 0.15,
    }


def qwen_result(config, speedup, machine=ANCHOR_MACHINE, remat=False):
    """A result `speedup` times the original code's rates."""
    original = benchmark.ORIGINAL[config]
    workload = benchmark.QwenVLWorkload(config)
    training = {
        "seconds": 1024 / (speedup * original["training"]),
        "tokens": 1024,
        # What the benchmark records: 3 x the forward pass of both rows,
        # the lm_head at the 256 loss slots of each.
        "flops": 3 * 2 * workload.flops(512, 256),
        "peak_rss_bytes": 0.75 * original["rss_gb"] * 1e9,
    }
    result = {
        "backend": "jax",
        "model": "qwenvl",
        "config": config,
        "machine": machine,
        "training": training,
    }
    if remat:
        return dict(result, remat=True)
    decode = speedup * original["decode"]
    return dict(
        result,
        vision={"seconds": 4 / (speedup * original["vision"]), "images": 4},
        prefill={"seconds": 1.0, "tokens": 1024, "flops": 1e11},
        generation=[generation(1, decode), generation(8, 4 * decode)],
        precisions={
            "float32": generation(1, decode),
            "int8": generation(1, 1.6 * decode),
            "bfloat16": generation(1, 1.2 * decode),
        },
    )


def report_of(*results, machine=ANCHOR_MACHINE):
    for result in results:
        result["derived"] = benchmark.derive(result, machine)
    return {"machine": machine, "repeats": 5, "new_tokens": 64,
            "results": list(results)}


def by_goal(rows, config="small"):
    return {row["goal"]: row for row in rows if row["config"] == config}


def test_goals_are_met_exactly_where_the_ratios_reach_their_targets():
    slow = by_goal(benchmark.goals(report_of(qwen_result("small", 1.0))))
    fast = by_goal(benchmark.goals(report_of(qwen_result("small", 2.5))))
    for goal in (
        "training >= 2x the original",
        "vision >= 1.5x the original",
        "batch-1 decoding >= 2x the original",
    ):
        assert abs(slow[goal]["ratio"] - 1.0) < 1e-9
        assert not slow[goal]["met"] and fast[goal]["met"], goal
    # Memory and first token are 'at most' goals.
    memory = fast["training peak memory <= 0.8x the original"]
    assert abs(memory["ratio"] - 0.75) < 1e-9 and memory["met"]
    ttft = fast["first token <= 0.4x the original"]
    expected = 150.0 / benchmark.ORIGINAL["small"]["ttft_ms"]
    assert abs(ttft["ratio"] - expected) < 1e-9
    assert ttft["met"]
    assert fast["int8 decoding >= 1.5x float32"]["met"]
    assert not fast["bfloat16 decoding >= 1.3x float32"]["met"]
    # Without PaliGemma in the run there is no row comparing to it.
    assert "training >= 1.3x PaliGemma" not in fast


def test_paligemma_and_remat_rows_compare_within_the_same_run():
    ours = qwen_result("small", 2.0)
    remat = qwen_result("small", 1.5, remat=True)
    paligemma = dict(qwen_result("small", 1.6), model="paligemma")
    paligemma.pop("precisions")
    rows = by_goal(benchmark.goals(report_of(ours, remat, paligemma)))
    assert abs(rows["training >= 1.3x PaliGemma"]["ratio"] - 1.25) < 1e-9
    assert not rows["training >= 1.3x PaliGemma"]["met"]
    remat_row = rows["training (remat) >= 2x the original"]
    assert abs(remat_row["ratio"] - 1.5) < 1e-9 and not remat_row["met"]
    # The PaliGemma result itself gets no goal rows: it only adds the two
    # comparisons to it.
    alone = benchmark.goals(report_of(ours, remat))
    together = benchmark.goals(report_of(ours, remat, paligemma))
    assert len(together) == len(alone) + 2


def test_needs_is_the_target_rate_over_what_the_machine_measured():
    rows = benchmark.goals(report_of(
        qwen_result("small", 1.0), qwen_result("base", 1.0)
    ))
    small, base = by_goal(rows, "small"), by_goal(rows, "base")
    decode = small["batch-1 decoding >= 2x the original"]["needs"]
    expected = 2 * benchmark.ORIGINAL["small"]["decode"] * DECODE_BYTES / 25e9
    assert abs(decode - expected) < 1e-9
    # On the anchor machine, "small" training at 2x asks for well under the
    # matmul peak; "base" training at 2x asks for more than the peak: its
    # step runs about 2.2 GFLOP per token (ViT at 1,024 patches, decoder,
    # lm_head at the loss slots) and 2 x 45.5 tokens/s of it is about 199
    # GFLOP/s against 190.
    assert small["training >= 2x the original"]["needs"] < 0.7
    assert 1.0 < base["training >= 2x the original"]["needs"] < 1.1
    # "base"'s first token, 0.4 x 2,024 ms: about 221 GFLOP (the 1,024-patch
    # image and 301 decoder positions) in 810 ms, 1.4x the peak.
    assert small["first token <= 0.4x the original"]["needs"] < 0.7
    assert base["first token <= 0.4x the original"]["needs"] > 1.3
    # Twice the peak halves what a target asks of the machine.
    faster = dict(ANCHOR_MACHINE, matmul_gflops=380.0, copy_gbps=50.0)
    rows = benchmark.goals(report_of(
        qwen_result("base", 1.0, machine=faster), machine=faster
    ))
    assert abs(
        by_goal(rows, "base")["training >= 2x the original"]["needs"]
        - base["training >= 2x the original"]["needs"] / 2
    ) < 1e-9


def test_render_rewrites_the_tables_from_a_saved_run(tmp_path):
    report = report_of(qwen_result("small", 2.2))
    for result in report["results"]:
        del result["derived"]
    with open(tmp_path / "results.json", "w") as f:
        json.dump(report, f)
    benchmark.main(["--render", "--out", str(tmp_path)])
    table = (tmp_path / "results.md").read_text()
    assert "| jax | small | training >= 2x the original |" in table
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["goals"] and all(row["met"] in (True, False)
                                  for row in saved["goals"])
    assert saved["results"][0]["derived"]["training_tokens_per_s"] > 0


def test_the_table_says_which_pytorch_generations_were_compiled():
    """Runs saved before bfloat16 or int8 generation compiled on PyTorch
    render as they ran; newer ones name them among the compiled."""
    def note(**compiled):
        result = dict(qwen_result("small", 2.0), backend="torch",
                      generation_compiled=True)
        for precision, was in compiled.items():
            result["precisions"][precision]["compiled"] = was
        text = benchmark.markdown(report_of(result))
        return next(line for line in text.splitlines()
                    if line.startswith("PyTorch: "))

    oldest = note()
    assert "float32 generation ran" in oldest
    assert "int8, bfloat16 and PaliGemma eagerly" in oldest
    assert note(bfloat16=False, int8=False) == oldest
    older = note(bfloat16=True)
    assert "float32 and bfloat16 generation ran" in older
    assert "int8 and PaliGemma eagerly" in older
    newest = note(bfloat16=True, int8=True)
    assert "float32, int8 and bfloat16 generation ran" in newest
    assert "`torch.compile`; PaliGemma eagerly" in newest
    eager = benchmark.markdown(report_of(qwen_result("small", 2.0)))
    assert "PyTorch: " not in eager


def test_workers_get_huge_pages_unless_the_user_chose(monkeypatch):
    monkeypatch.setattr(
        benchmark.platform, "libc_ver", lambda: ("glibc", "2.36")
    )
    monkeypatch.setattr(benchmark.sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("SOME_SETTING", "kept")
    environ = benchmark.worker_environment()
    assert environ["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert environ["SOME_SETTING"] == "kept"
    assert benchmark.worker_environment("jax") == environ
    # PyTorch's workers also keep the memory glibc frees.
    torch = benchmark.worker_environment("torch")
    assert torch["GLIBC_TUNABLES"].split(":") == [
        "glibc.malloc.hugetlb=1",
        "glibc.malloc.mmap_max=0",
        "glibc.malloc.trim_threshold=4294967296",
    ]
    assert torch["SOME_SETTING"] == "kept"
    # A choice of the user's stands, even an empty one (the opt-out).
    for chosen in ("", "glibc.malloc.arena_max=2"):
        monkeypatch.setenv("GLIBC_TUNABLES", chosen)
        for backend in (None, "torch"):
            environ = benchmark.worker_environment(backend)
            assert environ["GLIBC_TUNABLES"] == chosen
    # Too old a glibc for the tunable: nothing added.
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setattr(
        benchmark.platform, "libc_ver", lambda: ("glibc", "2.31")
    )
    assert "GLIBC_TUNABLES" not in benchmark.worker_environment()
    assert "GLIBC_TUNABLES" not in benchmark.worker_environment("torch")


def test_the_table_names_pytorch_workers_tunables_where_they_ran():
    machine = dict(
        ANCHOR_MACHINE,
        glibc_tunables="glibc.malloc.hugetlb=1",
        glibc_tunables_torch="glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0",
    )
    ours = qwen_result("small", 2.0)
    torch = dict(qwen_result("small", 1.5), backend="torch")
    header = benchmark.markdown(report_of(ours, torch, machine=machine))
    assert "(PyTorch's: 'glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0')" in (
        header
    )
    jax_only = benchmark.markdown(report_of(ours, machine=machine))
    assert "Workers' GLIBC_TUNABLES: 'glibc.malloc.hugetlb=1'." in jax_only
