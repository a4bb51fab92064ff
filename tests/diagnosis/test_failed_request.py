"""Naming the failed request: real recorded OOMs (the H100 fixture, the runner's CPU allocator) and
configs whose tensors are worked out by hand."""

import json
from pathlib import Path

import pytest

from diagnosis.analytic import estimate_analytic
from diagnosis.failed_request import (
    ATTENTION,
    LOGITS_LOSS,
    WEIGHTS,
    cuda_block_bytes,
    match_failed_request,
    postmortem_request,
    request_sentence,
)
from diagnosis.oom_text import parse_oom
from diagnosis.suggest import Evidence, failed_request_matches, suggest
from diagnosis.units import GIB, MIB
from trainer.config import validate_config

H100 = Path(__file__).resolve().parents[1] / "fixtures" / "gpu" / "torch-2.11.0-cu130-NVIDIA-H100-80GB-HBM3"


def _recorded_oom() -> dict:
    return json.loads((H100 / "oom.json").read_text())


def test_a_real_cuda_oom_is_named_as_eager_attentions_scores_from_the_observer_and_from_the_text():
    """Recorded on the H100: tiny-llama, eager attention, 2 × 4,096 tokens, fp32, under a 0.25 GiB
    cap. The observer's 536,870,912 bytes, and the message's "512.00 MiB", are 2 × 4 heads × 4,096²
    × 4 B."""
    recorded = _recorded_oom()
    cfg = validate_config(recorded["config"])
    exact = match_failed_request(recorded["capture"]["requested_bytes"], cfg, device="cuda")
    assert [m.location for m in exact] == [ATTENTION]
    assert dict(exact[0].dims) == {"batch": 2, "heads": 4, "tokens": 4096} and exact[0].dtype == "fp32"
    message = parse_oom(recorded["error_text"])
    assert failed_request_matches(Evidence(config=cfg, message=message)) == exact
    sentence = request_sentence(message.requested_bytes, exact)
    assert sentence.startswith("The failed 512.0 MiB request is 2 × 4 × 4,096 × 4,096 × 4 B")
    assert "eager attention" in sentence


def test_the_suggestion_for_a_named_attention_request_says_so_and_is_sure():
    recorded = _recorded_oom()
    cfg = validate_config(recorded["config"])
    ev = Evidence(config=cfg, message=parse_oom(recorded["error_text"]))
    (attention,) = [s for s in suggest(ev, estimate_analytic) if s.category == "efficient_attention"]
    assert attention.confidence == "high"
    assert "The failed 512.0 MiB request is 2 × 4 × 4,096 × 4,096 × 4 B" in attention.why


def _qwen_7b(**train) -> object:
    return validate_config(
        {
            "model": {"name": "qwen2.5-7b", "dtype": "bf16", "gradient_checkpointing": True},
            "lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]},
            "data": {"seq_len": 4096},
            "train": {"micro_batch_size": 2, **train},
        }
    )


def test_a_pasted_qwen_message_of_4_64_gib_is_the_logits_fp32_copy():
    """2 × 4,096 × 152,064 × 4 B = 4.6406 GiB, printed "4.64 GiB"; the bf16 logits are "2.32 GiB"."""
    cfg = _qwen_7b()
    text = (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.64 GiB. GPU 0 has a total capacity of "
        "23.55 GiB of which 3.12 GiB is free. Of the allocated memory 19.80 GiB is allocated by PyTorch, and "
        "118.00 MiB is reserved by PyTorch but unallocated."
    )
    (fp32,) = failed_request_matches(Evidence(config=cfg, message=parse_oom(text)))
    assert fp32.location == LOGITS_LOSS and fp32.dtype == "fp32" and "fp32 copy the loss makes" in fp32.what
    assert dict(fp32.dims) == {"batch": 2, "tokens": 4096, "vocab": 152064}
    (bf16,) = match_failed_request(int(2.32 * GIB), cfg, device="cuda", printed=True)
    assert bf16.dtype == "bf16" and bf16.what == "the logits (the LM head's output)"
    chunked = [s for s in suggest(Evidence(config=cfg, message=parse_oom(text))) if s.category == "chunked_loss"]
    assert chunked and "The failed 4.6 GiB request is 2 × 4,096 × 152,064 × 4 B" in chunked[0].why


def test_rocm_and_mps_messages_are_read_by_their_own_allocators_rules():
    """HIP shares CUDA's caching allocator; MPS prints the tensor's size to two decimals, unrounded."""
    cfg = _qwen_7b()
    hip = parse_oom(
        "torch.OutOfMemoryError: HIP out of memory. Tried to allocate 4.64 GiB. GPU 0 has a total capacity of 23.98 GiB"
    )
    mps = parse_oom(
        "RuntimeError: MPS backend out of memory (MPS allocated: 14.10 GiB, other allocations: 1.02 GiB, max allowed: "
        "18.13 GiB). Tried to allocate 4.64 GiB on private pool."
    )
    assert (hip.backend, mps.backend) == ("hip", "mps")
    for message in (hip, mps):
        (match,) = failed_request_matches(Evidence(config=cfg, message=message))
        assert match.location == LOGITS_LOSS and match.dtype == "fp32"


def test_the_failing_batchs_own_length_is_what_is_matched():
    """Variable-length data: the post-mortem's batch (1 × 3,000 tokens), not the config's 4,096."""
    cfg = _qwen_7b(micro_batch_size=1)
    size = cuda_block_bytes(3000 * 152064 * 4)
    assert not match_failed_request(size, cfg, device="cuda")
    postmortem = {
        "device": "cuda:0",
        "requested_bytes": size,
        "allocator_stats": {"num_ooms": 1},  # the observer fired: the size is the block's, exact
        "batch_shape": {"batch_size": 1, "seq_len": 3000},
        "phase": "forward",
    }
    (match,) = postmortem_request(postmortem, cfg)
    assert dict(match.dims)["tokens"] == 3000 and match.location == LOGITS_LOSS


def test_an_optimizer_step_failure_is_read_as_a_weight_sized_copy():
    """Llama-3.2-1B full fine-tune in fp32: the embedding's AdamW state is 128,256 × 2,048 × 4 B."""
    cfg = validate_config(
        {"model": {"name": "llama-3.2-1b"}, "lora": None, "data": {"seq_len": 512}, "train": {"micro_batch_size": 1}}
    )
    size = 128256 * 2048 * 4
    (match,) = match_failed_request(size, cfg, device="cuda", phase="optimizer")
    assert match.location == WEIGHTS and "AdamW state" in match.what


def test_requests_too_small_or_unlike_any_tensor_or_of_an_unknown_model_are_not_named():
    cfg = _qwen_7b()
    assert match_failed_request(20 * MIB, cfg, device="cuda", printed=True) == []  # one of many 20 MiB blocks
    assert match_failed_request(int(3.33 * GIB), cfg, device="cuda", printed=True) == []
    assert match_failed_request(None, cfg, device="cuda") == []
    assert failed_request_matches(Evidence(message=parse_oom("CUDA out of memory. Tried to allocate 4.64 GiB"))) == []


def test_the_cuda_block_is_what_the_allocator_reports():
    assert cuda_block_bytes(100) == 2 * MIB
    assert cuda_block_bytes(3 * MIB) == 20 * MIB
    assert cuda_block_bytes(4 * 1023 * 32000 * 4) == 500 * MIB  # rounded up to the next 2 MiB
    assert cuda_block_bytes(512 * MIB) == 512 * MIB


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_on_the_cpu_the_allocators_bytes_are_matched_exactly(dtype):
    cfg = validate_config(
        {
            "model": {"name": "tinyllama-1.1b", "dtype": dtype},
            "lora": None,
            "data": {"seq_len": 1024},
            "train": {"micro_batch_size": 4, "device": "cpu"},
        }
    )
    vocab = 32000
    exact = 4 * 1024 * vocab * 4
    (match,) = match_failed_request(exact, cfg, device="cpu")
    assert match.location == LOGITS_LOSS and match.nbytes == exact
    assert match_failed_request(exact + 4096, cfg, device="cpu") == []


def _segment_creations(path: Path) -> list[tuple[int, int]]:
    """(request, segment) for every segment the allocator created for one request: in a snapshot's
    device trace, a `segment_alloc` followed at once by the `alloc` it was made for."""
    from diagnosis.safe_pickle import load_path

    data = load_path(path)
    traces = data.get("device_traces", []) if isinstance(data, dict) else []
    return [
        (alloc["size"], segment["size"])
        for trace in traces
        for segment, alloc in zip(trace, trace[1:], strict=False)
        if segment.get("action") == "segment_alloc" and alloc.get("action") == "alloc"
    ]


def test_the_block_rule_is_what_real_gpus_allocated_for_every_new_segment():
    """Recorded by others on real GPUs, several torch releases (tests/fixtures/snapshots), and on our
    H100: each segment made for one request is the size `cuda_block_bytes` gives that request."""
    recordings = [*sorted((H100.parents[1] / "snapshots").glob("*.p*")), H100 / "oom_snapshot.pickle.gz"]
    pairs = [pair for path in recordings for pair in _segment_creations(path)]
    assert len(pairs) > 500 and len({request for request, _ in pairs}) > 10
    assert [(r, s) for r, s in pairs if cuda_block_bytes(r) != s] == []
    assert {s for _, s in pairs} & {2 * MIB, 20 * MIB} and any(s > 20 * MIB for _, s in pairs)


def test_a_litgpt_run_is_read_as_its_own_code_runs_the_loss():
    """litgpt holds the logits in 128-token bf16 chunks and dequantises its 4-bit lm_head per chunk:
    a request of the whole micro-batch's fp32 logits cannot be its, a chunk's or the head's can."""
    model = {"name": "llama-3-8b", "dtype": "bf16", "quantization": "nf4", "prepare_for_kbit_training": False}
    run = {"data": {"seq_len": 1536}, "train": {"micro_batch_size": 2}}
    transformers = validate_config({"model": model, **run})
    litgpt = validate_config({"model": {**model, "implementation": "litgpt"}, **run})
    whole_fp32 = cuda_block_bytes(2 * 1536 * 128256 * 4)
    assert match_failed_request(whole_fp32, transformers, device="cuda")
    assert not match_failed_request(whole_fp32, litgpt, device="cuda")
    (chunk,) = match_failed_request(cuda_block_bytes(2 * 128 * 128256 * 2), litgpt, device="cuda")
    assert chunk.location == LOGITS_LOSS and dict(chunk.dims) == {"batch": 2, "chunk tokens": 128, "vocab": 128256}
    # The same size as a bf16 copy of the embedding, which is named beside it.
    heads = match_failed_request(cuda_block_bytes(128256 * 4096 * 2), litgpt, device="cuda")
    assert any("lm_head dequantised" in match.what for match in heads)
