"""`arzoo.nn.mamba.Mamba2`: chunked SSD scan vs a token-by-token reference written here, chunk-size
independence, carried state (conv window included), mamba-ssm kernels vs PyTorch (CUDA only), and no
import of the optional kernels on CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from arzoo.nn.mamba import Mamba2, Mamba2State, mamba_kernels

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 2e-5


CONFIGS = {
    "mvar": dict(d_model=32, d_state=16, headdim=16),  # ngroups 1, 4 heads
    "groups": dict(d_model=32, d_state=8, headdim=8, ngroups=2, D_has_hdim=True),
    "gated_mlp": dict(d_model=32, d_state=8, headdim=16, d_ssm=32),  # d_ssm < d_inner
    "no_rmsnorm": dict(d_model=16, d_state=8, headdim=8, rmsnorm=False, d_conv=3),
}


def _make(name: str, seed: int = 0, **extra) -> Mamba2:
    torch.manual_seed(seed)
    m = Mamba2(**CONFIGS[name], chunk_size=8, **extra)
    with torch.no_grad():  # make every parameter non-trivial, and the decays visible
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        m.dt_bias.uniform_(-1.5, 0.5)
        m.A_log.uniform_(-1.0, 1.0)
    return m.eval()


def _reference(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """mamba-ssm's math token by token: explicit conv taps, Python loop over t, grouped RMSNorm."""
    batch, length, _ = u.shape
    h, p, g, n, w = m.nheads, m.headdim, m.ngroups, m.d_state, m.d_conv
    z0, x0, z, xBC, dt = torch.split(
        m.in_proj(u), [m.d_mlp, m.d_mlp, m.d_ssm, m.d_ssm + 2 * g * n, h], dim=-1
    )
    padded = F.pad(xBC, (0, 0, w - 1, 0))
    conv = sum(padded[:, k:k + length] * m.conv1d.weight[:, 0, k] for k in range(w))
    if m.conv1d.bias is not None:
        conv = conv + m.conv1d.bias
    xBC = F.silu(conv)
    x, B, C = torch.split(xBC, [m.d_ssm, g * n, g * n], dim=-1)
    x = x.view(batch, length, h, p)
    B, C = B.view(batch, length, g, n), C.view(batch, length, g, n)
    group = torch.arange(h) // (h // g)
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    D = m.D.view(h, p) if m.D_has_hdim else m.D.view(h, 1)
    s = torch.zeros(batch, h, p, n)
    ys = []
    for t in range(length):
        Bt, Ct = B[:, t, group], C[:, t, group]  # (batch, h, n)
        s = s * torch.exp(dt[:, t] * A)[..., None, None] + dt[:, t, :, None, None] * x[:, t, :, :, None] * Bt[:, :, None]
        ys.append((s * Ct[:, :, None]).sum(-1) + D * x[:, t])
    y = torch.stack(ys, 1).reshape(batch, length, h * p)
    if m.rmsnorm:
        y = y * F.silu(z)
        yg = y.view(batch, length, g, -1)
        y = (yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + m.norm.eps)).reshape_as(y) * m.norm.weight
    else:
        y = y * F.silu(z)
    if m.d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return m.out_proj(y)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_matches_sequential_reference(name: str) -> None:
    m = _make(name)
    u = torch.randn(2, 37, m.d_model)
    with torch.no_grad():
        ref = _reference(m, u)
        out = m(u)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)


def test_state_dict_matches_mamba_ssm_layout() -> None:
    m = Mamba2(64, d_state=64, d_conv=4, expand=2)  # M-VAR's mixer at C = 64
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "dt_bias": (2,), "A_log": (2,), "D": (2,),
        "in_proj.weight": (386, 64),
        "conv1d.weight": (256, 1, 4), "conv1d.bias": (256,),
        "norm.weight": (128,),
        "out_proj.weight": (64, 128),
    }
    # mamba-ssm's init ranges: A in [1, 16], dt = softplus(dt_bias) in [1e-3, 0.1], D = 1, norm = 1
    assert ((-m.A_log.exp() <= -1 + 1e-6) & (m.A_log.exp() <= 16 + 1e-4)).all()
    dt = F.softplus(m.dt_bias)
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-6)).all()
    assert torch.equal(m.D, torch.ones(2)) and torch.equal(m.norm.weight, torch.ones(128))


@pytest.mark.parametrize("name", ["mvar", "groups"])
def test_chunk_size_independence(name: str) -> None:
    m = _make(name)
    u = torch.randn(2, 41, m.d_model)
    with torch.no_grad():
        outs = [m(u, chunk_size=cs) for cs in (1, 3, 8, 16, 41, 256)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", ["mvar", "groups", "gated_mlp", "no_rmsnorm"])
def test_carried_state_equals_one_pass(name: str) -> None:
    """Pieces shorter than the conv window (1, 2 tokens) exercise the carried conv inputs."""
    m = _make(name)
    u = torch.randn(3, 30, m.d_model)
    with torch.no_grad():
        full, full_state = m(u, return_state=True)
        for cuts in ([1, 2, 3, 9], [29]):
            outs, state, start = [], None, 0
            for end in [*cuts, u.shape[1]]:
                out, state = m(u[:, start:end], state=state, return_state=True, chunk_size=4)
                outs.append(out)
                start = end
            torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(state.ssm_state, full_state.ssm_state, atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(state.conv_state, full_state.conv_state, atol=1e-6, rtol=1e-5)


def test_step_and_zero_state() -> None:
    m = _make("mvar")
    u = torch.randn(2, 12, m.d_model)
    with torch.no_grad():
        full, full_state = m(u, return_state=True)
        # a zero state is the start of a sequence, and the given state is never modified in place
        zero = m.allocate_state(2)
        assert isinstance(zero, Mamba2State)
        assert zero.conv_state.shape == (2, m.conv_dim, m.d_conv)
        assert zero.ssm_state.shape == (2, m.nheads, m.headdim, m.d_state)
        torch.testing.assert_close(m(u, state=zero), full, atol=0, rtol=0)
        assert not zero.conv_state.any() and not zero.ssm_state.any()
        # prefix in one call, then token by token with step() (both (B, 1, D) and (B, D) inputs)
        outs, state = [m(u[:, :5], return_state=True)[0]], m(u[:, :5], return_state=True)[1]
        for t in range(5, 12):
            inp = u[:, t] if t % 2 else u[:, t:t + 1]
            out, state = m.step(inp, state)
            outs.append(out.unsqueeze(1) if t % 2 else out)
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(state.ssm_state, full_state.ssm_state, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(state.conv_state, full_state.conv_state)
        out, state = m.step(u[:, 0], None)
        torch.testing.assert_close(out, full[:, 0], atol=ATOL, rtol=1e-4)


def test_backward_through_chunked_scan() -> None:
    m = _make("groups").train()
    u = torch.randn(2, 19, m.d_model, requires_grad=True)
    m(u, chunk_size=4).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(u.grad).all()


def test_torch_backend_on_cpu_rejects_kernels() -> None:
    m = _make("mvar", backend="kernels")
    with pytest.raises(RuntimeError, match="kernels"):
        m(torch.randn(1, 4, m.d_model))


def test_import_and_cpu_forward_do_not_import_kernels() -> None:
    code = (
        "import sys, torch\n"
        "import arzoo.nn.mamba, arzoo.nn.mvar\n"
        "m = arzoo.nn.mamba.Mamba2(32, d_state=16, headdim=16)\n"
        "m(torch.randn(1, 5, 32))\n"
        "b = arzoo.nn.mvar.MVARBlock(32, 2, (1, 2), mamba_kwargs={'d_state': 16, 'headdim': 16})\n"
        "b(torch.randn(1, 5, 32), torch.randn(1, 32))\n"
        "print(','.join(k for k in ('mamba_ssm', 'causal_conv1d', 'flash_attn', 'triton') if k in sys.modules))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"optional kernels imported: {out.stdout.strip()}"


def _cuda_kernels_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if mamba_kernels() is None:
        return "needs mamba-ssm (not importable here)"
    return None


@pytest.mark.cuda
@pytest.mark.skipif(_cuda_kernels_skip_reason() is not None, reason=str(_cuda_kernels_skip_reason()))
@pytest.mark.parametrize("name", ["mvar", "groups"])
def test_cuda_kernels_match_torch(name: str) -> None:
    """mamba-ssm's fused path, its split path with states, and its step kernels vs the PyTorch path
    (float32; Triton matmuls may use TF32, hence the loose tolerance)."""
    m = _make(name).cuda()
    u = torch.randn(2, 300, m.d_model, device="cuda")
    with torch.no_grad():
        m.backend = "torch"
        ref, ref_state = m(u, return_state=True)
        m.backend = "kernels"
        torch.testing.assert_close(m(u), ref, atol=2e-3, rtol=2e-3)
        out1, state = m(u[:, :200], return_state=True)
        out2, state = m(u[:, 200:299], state=state, return_state=True)
        out3, state = m.step(u[:, 299:], state)
        torch.testing.assert_close(torch.cat([out1, out2, out3], 1), ref, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(state.ssm_state, ref_state.ssm_state, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(state.conv_state.float(), ref_state.conv_state.float())
