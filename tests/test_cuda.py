"""CUDA paths, checked against the CPU/naive references. Skipped without a GPU (CI has none); run by
benchmarks/gpu_check.py on a GPU machine."""

import pytest
import torch

from gptlab.model import GPT, GPTConfig
from gptlab.model.attention import attend, bool_mask, make_mask_mod, naive_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kind", ["dense", "local", "strided", "fixed"])
def test_flex_and_sdpa_match_naive_on_cuda(kind):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=10, block_size=512, n_layer=1, n_head=2, n_embd=64, local_window=64,
                    sparse_stride=32, sparse_c=4)
    q, k, v = (torch.randn(2, 4, 256, 32, device="cuda") for _ in range(3))
    ref = naive_attention(q, k, v, bool_mask(make_mask_mod(kind, 64, 32, 4), 256, 256, "cuda"))
    for backend in ("flex", "sdpa"):
        torch.testing.assert_close(attend(q, k, v, kind, cfg, backend=backend), ref, atol=2e-3, rtol=2e-3)


def test_bf16_training_step_on_cuda_matches_fp32_loss():
    from gptlab.runtime import resolve_dtype

    assert resolve_dtype("auto", "cuda") == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_embd=128, attention=("dense", "local"),
                    local_window=32)
    m = GPT(cfg).cuda()
    x = torch.randint(0, 256, (4, 128), device="cuda")
    with torch.no_grad():
        ref = m(x, x)[1].item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(x, x)[1]  # training mode: FlexAttention for the local layer
    loss.backward()
    assert abs(loss.item() - ref) < 0.05 and all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_cuda_greedy_decoding_matches_cpu():
    from gptlab.generate import Generator, SamplingParams
    from gptlab.tokenizer import train_bpe

    tok = train_bpe(["the quick brown fox jumps over the lazy dog"] * 10, 30, progress=False)
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()
    p = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    cpu = Generator(m, tok).generate(["the quick"], p)[0].token_ids
    gpu = Generator(m.cuda(), tok).generate(["the quick"], p)[0].token_ids
    assert gpu == cpu
