"""The simulator: conservation, determinism, a case worked by hand, traces, and the command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from infinillm.errors import ValidationError
from infinillm.sim import (
    POLICIES, ClusterSpec, Simulation, TraceRequest, TraceSpec, generate_trace, gpu, model_shape, read_trace_csv,
    simulate, write_trace_csv,
)
from infinillm.sim.experiment import PaperTrace, format_table, plot_kv_use, plot_throughput, run_experiment, summary_json

A100 = gpu("a100")
L7B = model_shape("llama2-7b")


def small_cluster(num_gpus: int = 4, **kw) -> ClusterSpec:
    return ClusterSpec(A100, L7B, num_gpus, 1, **kw)


def mixed_trace(n: int = 40, rate: float = 4.0, seed: int = 0) -> list[TraceRequest]:
    # Contexts up to 300K tokens on 4 instances of ~111K each: some must borrow, some cannot fit one instance.
    return generate_trace(TraceSpec("mixed", 2, 300_000, n, "loguniform", max_output=64, include_max=True), rate, seed)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_completes_or_is_rejected_with_a_reason_and_no_block_leaks(core, policy):
    trace = mixed_trace()
    sim = Simulation(small_cluster(), policy, trace, core=core)
    res = sim.run()
    for r in res.requests:
        assert (r.finish_s is None) != (r.rejected is None), r
        if r.finish_s is not None:
            assert r.generated == r.output_tokens and r.first_token_s is not None
            assert r.arrival_s <= r.first_token_s <= r.finish_s
        else:
            assert "blocks" in r.rejected and str(r.index) in r.rejected  # names the request and the limit
    assert res.leaked_blocks == 0
    for inst in sim.instances:  # every pool back to all free, nothing reserved, lent or borrowed
        c = inst.pool.counters()
        assert (c.free, c.used, c.lent, c.reserved, c.borrowed) == (c.capacity, 0, 0, 0, 0)
        assert inst.tables.num_requests == 0 and inst.planner.num_requests == 0
    sim._sync_ledger()
    totals = sim.ledger.totals()
    assert totals.used == 0 and totals.lent == 0 and totals.free == totals.capacity
    assert sim.ledger.num_requests == 0
    if policy in ("infinite-llm", "borrow-only", "vllm-single"):  # the cluster holds the 300K request
        assert not res.rejected
        assert res.max_context_served == 300_000
    else:  # one instance holds ~111K tokens: the longest are refused, the rest served
        assert res.rejected and all(r.context_tokens > 100_000 for r in res.rejected)
    if policy in ("infinite-llm", "borrow-only"):
        assert res.num_loans > 0
        assert max(r.most_instances for r in res.requests) > 1


def test_the_same_seed_gives_the_same_run_and_another_seed_another():
    def run(seed):
        res = simulate(small_cluster(), "infinite-llm", mixed_trace(seed=seed))
        return [(r.home, r.first_token_s, r.finish_s, r.most_instances) for r in res.requests], res.num_moves

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_compiled_core_and_twin_make_the_same_decisions():
    from infinillm import core_sched

    if not core_sched.compiled_available():
        pytest.skip("compiled core not built")
    runs = []
    for name in ("compiled", "python"):
        res = simulate(small_cluster(), "infinite-llm", mixed_trace(), core=core_sched.implementation(name))
        runs.append([(r.home, r.finish_s) for r in res.requests] + [res.num_loans, res.num_moves, res.num_preemptions])
    assert runs[0] == runs[1]


def test_one_request_on_one_a100_worked_by_hand():
    """LLaMA2-7B, 100-token prompt, 3 new tokens, alone on one A100: three steps (the prefill,
    which samples the first token, then two decodes), each memory bound.

    Per step the dense layers read the weights once: 32 layers x 202,375,168 parameters plus
    the 32,000 x 4,096 output head = 6,607,077,376 parameters = 13,214,154,752 bytes in bf16,
    plus 3,686,400 bytes of activations per token (32 layers x (6 x 4096 + 3 x 11008) x 2);
    HBM at 80% of 2,039 GB/s = 1.6312e12 B/s. The prefill's 1.2955e12 FLOPs take 5.9 ms at 70%
    of 312 TFLOP/s, less than its 8.33 ms of reading: memory bound too. Attention reads each
    context token's k and v (524,288 bytes over 32 layers) once; each step adds 0.5 ms of host
    overhead."""
    bw = 2.039e12 * 0.8
    weights = 13_214_154_752
    act = 3_686_400
    kv = 524_288
    overhead = 0.5e-3
    prefill = (weights + 100 * act) / bw + overhead + 100 * kv / bw
    decode1 = (weights + act) / bw + overhead + 101 * kv / bw
    decode2 = (weights + act) / bw + overhead + 102 * kv / bw
    spec = ClusterSpec(A100, L7B, num_gpus=1, instance_tp=1)
    res = simulate(spec, "vllm-multi", [TraceRequest(0.0, 100, 3)])
    r = res.requests[0]
    assert r.first_token_s == pytest.approx(prefill, rel=1e-12)
    assert r.finish_s == pytest.approx(prefill + decode1 + decode2, rel=1e-12)
    assert res.num_steps == 3
    assert res.throughput == pytest.approx(103 / r.finish_s)


def test_a_request_longer_than_one_instance_borrows_under_infinite_llm_and_is_refused_by_vllm_multi():
    spec = ClusterSpec(A100, L7B, num_gpus=2, instance_tp=1)  # 6,976 blocks of 16 tokens each
    trace = [TraceRequest(0.0, 149_990, 10)]  # 9,375 blocks
    multi = simulate(spec, "vllm-multi", trace)
    assert multi.requests[0].rejected == "request 0 needs 9375 blocks (150000 tokens) but the cluster has 6976 blocks"
    pooled = simulate(spec, "infinite-llm", trace)
    r = pooled.requests[0]
    assert r.finish_s is not None and r.most_instances == 2 and pooled.num_loans > 0
    assert pooled.leaked_blocks == 0


def test_traces_from_csv_round_trip_and_bad_files_are_named(tmp_path):
    trace = mixed_trace(n=10)
    path = tmp_path / "t.csv"
    write_trace_csv(trace, path)
    back = read_trace_csv(path)
    assert [(r.prompt_tokens, r.output_tokens) for r in back] == [(r.prompt_tokens, r.output_tokens) for r in trace]
    assert [round(r.arrival_s, 6) for r in back] == [round(r.arrival_s, 6) for r in trace]
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival,prompt\n0,1\n")
    with pytest.raises(ValidationError, match="arrival_s,prompt_tokens,output_tokens"):
        read_trace_csv(bad)
    bad.write_text("arrival_s,prompt_tokens,output_tokens\n0,12,0\n")
    with pytest.raises(ValidationError, match=r"bad.csv:2"):
        read_trace_csv(bad)
    with pytest.raises(ValidationError, match="cannot be read"):
        read_trace_csv(tmp_path / "missing.csv")
    with pytest.raises(ValidationError, match="rate"):
        generate_trace(TraceSpec("x", 2, 10, 1), 0.0)


def test_the_experiment_reports_a_table_plots_and_the_summary(tmp_path):
    traces = [
        PaperTrace(0, "llama2-7b", TraceSpec("short", 2, 20_000, 30, "loguniform", max_output=32), "short"),
        PaperTrace(1, "llama2-7b", TraceSpec("long", 2, 400_000, 12, "loguniform", max_output=16, include_max=True), "long"),
    ]
    outcomes = run_experiment(traces, num_gpus=8, factors=(0.5, 2.0), processes=1, progress=False)
    assert len(outcomes) == 2 * 2 * len(POLICIES)
    assert all(o.leaked_blocks == 0 for o in outcomes)
    table = format_table(traces, outcomes)
    assert "short" in table and "long" in table and "vs vllm-multi" in table
    for p in POLICIES:
        assert p in table
    summary = summary_json(traces, outcomes)
    assert list(summary)[:3] == ["min_ratio_short_vs_multi", "min_ratio_long_vs_single", "max_context_tokens"]
    assert all(isinstance(summary[k], float) for k in summary if k.startswith("min_ratio"))
    assert summary["max_context_tokens"] == 400_000
    plot_throughput(traces, outcomes, tmp_path / "t.png")
    plot_kv_use(traces[0], outcomes, tmp_path / "k.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"


def test_the_command_serves_a_csv_trace(tmp_path):
    path = tmp_path / "t.csv"
    write_trace_csv(mixed_trace(n=12), path)
    p = subprocess.run([sys.executable, "-m", "infinillm.cli", "sim", "--trace", str(path), "--num-gpus", "4",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(summary["throughput"]) == set(POLICIES)
    assert summary["max_context_tokens"] == 300_000
    bad = subprocess.run([sys.executable, "-m", "infinillm.cli", "sim", "--trace", str(tmp_path / "nope.csv")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "nope.csv" in bad.stderr and "cannot be read" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "infinillm.cli", "sim", "--paper", "--policies", "vllm"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "--policies" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "infinillm.cli", "sim", "--trace", str(path), "--out", str(path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "--out" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "infinillm.cli", "sim", "--trace", str(path), "--model", "llama2-70b",
                          "--instance-tp", "1"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "must hold LLaMA2-70B's weights" in bad.stderr and not bad.stdout


def test_the_cost_model_stays_near_the_published_figures(capsys):
    """docs/SIMULATION.md's table: the roofline within 10% of gpt-fast's and TensorRT-LLM's
    measurements (vLLM of 2023 is slower than the model: host overheads)."""
    from infinillm.sim.cli import main
    from infinillm.sim.published import comparisons, distattention_vs_headwise

    for r in comparisons():
        assert 0.5 < r.ratio < 1.2, r
    close = [r for r in comparisons() if "gpt-fast" in r.source or "TensorRT" in r.source]
    assert len(close) == 5 and all(0.9 <= r.ratio <= 1.1 for r in close), close
    h, d = distattention_vs_headwise(262144, 8)
    assert d >= h and d / h < 1.01  # the same bytes, plus one message per layer
    assert main(["--published"]) == 0
    assert "gpt-fast" in capsys.readouterr().out


def test_bad_values_get_a_clear_error_naming_the_value_and_the_limit(tmp_path):
    """From an adversarial review of the simulator: each was a traceback, a hang or a wrong figure."""
    with pytest.raises(ValidationError, match=r"arrival_s=-5.0 is invalid"):
        TraceRequest(-5.0, 10, 1)
    with pytest.raises(ValidationError, match=r"prompt_tokens=100.5 is invalid"):
        TraceRequest(0.0, 100.5, 1)
    with pytest.raises(ValidationError, match=r"rate='3' is invalid"):
        generate_trace(TraceSpec("x", 2, 10, 1), "3")
    with pytest.raises(ValidationError, match=r"rate=1000000000000.0 is invalid: x duration_s=1"):
        generate_trace(TraceSpec("x", 2, 10, 0, duration_s=1.0), 1e12)  # would be 1e12 requests
    with pytest.raises(ValidationError, match=r"num_requests=5 is invalid: with duration_s=10"):
        TraceSpec("x", 2, 10, 5, duration_s=10.0)
    with pytest.raises(ValidationError, match=r"planner_interval_s=1e-12 is invalid"):
        ClusterSpec(A100, L7B, 8, 1, planner_interval_s=1e-12)  # (was a hang)
    with pytest.raises(ValidationError, match=r"block_size=7 is invalid"):
        ClusterSpec(A100, L7B, 8, 1, block_size=7)
    with pytest.raises(ValidationError, match=r"gemm_flops=0 is invalid"):
        from infinillm.sim import Efficiency

        Efficiency(gemm_flops=0)
    with pytest.raises(ValidationError, match=r"memory_utilization=0.01' is invalid: must hold LLaMA2-7B's weights"):
        Simulation(ClusterSpec(A100, L7B, 8, 1, memory_utilization=0.01), "vllm-multi", [TraceRequest(0.0, 1, 1)])
    # CSV: a header with spaces, a byte-order mark, extra values, text that is not UTF-8.
    ok = tmp_path / "ok.csv"
    ok.write_bytes("\ufeffarrival_s, prompt_tokens, output_tokens\r\n0.5,10,2\r\n\r\n".encode())
    assert read_trace_csv(ok) == [TraceRequest(0.5, 10, 2)]
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,10,99\n")
    with pytest.raises(ValidationError, match=r"bad.csv:2' is invalid: must hold 3 values"):
        read_trace_csv(bad)
    bad.write_bytes(b"arrival_s,prompt_tokens,output_tokens\n0,\xff\xfe,1\n")
    with pytest.raises(ValidationError, match="is not UTF-8"):
        read_trace_csv(bad)


def test_throughput_counts_from_the_first_arrival_and_idle_time_costs_nothing():
    spec = small_cluster(8)
    at0 = simulate(spec, "infinite-llm", [TraceRequest(0.0, 100, 10)])
    late = simulate(spec, "infinite-llm", [TraceRequest(1e9, 100, 10)])  # (was 0 tok/s, and minutes of planner rounds)
    assert late.makespan_throughput == pytest.approx(at0.makespan_throughput, rel=1e-6)
    assert late.throughput == pytest.approx(at0.throughput, rel=1e-6)
    gap = simulate(spec, "infinite-llm", [TraceRequest(0.0, 100, 10), TraceRequest(1e7, 100, 10)])
    assert len(gap.completed) == 2 and gap.leaked_blocks == 0
    # vllm-single over a cluster that is not a power of two (3 nodes of 8)
    assert simulate(ClusterSpec(A100, L7B, 24, 1), "vllm-single", [TraceRequest(0.0, 100, 10)]).completed
