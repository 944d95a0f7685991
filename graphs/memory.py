"""The associative memory of every layer: DPFP feature map, read before the layer, write after it.

Per layer l and batch row b the state is A (K, d), z (K,) and `written` (has any segment written yet);
K = 2 * nu * d_mem. All memory arithmetic runs in fp32 whatever the compute dtype of the layers
(the reference), except in `memory_read_fast` (below).

    read :  q = phi(h Wq);  h <- h + (q A) / (q . z + eps)              (only where written)
    write:  k = phi(m Wk);  v = m Wv;  beta = sigmoid(m Wb + bb)         (m = the M memory rows)
            v_prev, gamma = 0, 1                                         (first write)
                          = (k A) / (k . z + eps), clip(1 - (k . z + eps) / (|k|^2 + eps), 0, 1)
            A <- A + sum_rows beta * k^T (v - v_prev);   z <- z + sum_rows gamma * k

`memory_read_fast` (fp16/bf16 graphs traced at opset 23 only, exporter/trace.py `fast_memory`): the
same read laid out for tensor cores; A and z stay fp32, the full slot is never cast to fp32:

    q   = phi(fp32(h Wq))               h Wq in the compute dtype (fp32 accumulation): the output is
                                        on the hidden state's scale, as the layers' own projections
    qs  = q / (q . z + eps)             fp32, K wide (the division folded into q, not the d-wide num)
    num = qs A                          bf16: bf16 x bf16(A), fp32 accumulation, bf16 out;
                                        fp16: fp32 (runs as TF32 on ONNX Runtime CUDA), then cast to
                                        fp16 once (fp16's range overflows on qs and on A of a long run)
    h   <- where(written, h + num, h)   compute dtype (unwritten rows: h bit for bit)

The write keeps the reference math (M rows only; its fp32 products run as TF32 in those graphs).
"""

from __future__ import annotations

import torch

EPS = 1e-5


def dpfp(x: torch.Tensor, nu: int) -> torch.Tensor:
    """Deterministic parameter-free projection: (..., d_mem) -> (..., 2 * nu * d_mem)."""
    u = torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)  # (..., 2 d_mem)
    return torch.cat([u * torch.roll(u, shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def _mem_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (n, B, R, d) fp32 @ w (n, d, out) -> (n, B, R, out)."""
    return torch.matmul(x, w[:, None])


def memory_read(h: torch.Tensor, w_q: torch.Tensor, A: torch.Tensor, z: torch.Tensor,
                written: torch.Tensor, nu: int) -> torch.Tensor:
    """Add the memory's answer to every row of a slot.

    h (n, B, P, d) any dtype; w_q (n, d, d_mem) fp32; A (n, B, K, d) fp32; z (n, B, K) fp32;
    written (n, B) bool. Rows whose memory was never written pass through unchanged.
    """
    h32 = h.float()
    q = dpfp(_mem_linear(h32, w_q), nu)  # (n, B, P, K)
    num = torch.matmul(q, A)  # (n, B, P, d)
    den = torch.matmul(q, z[..., None]) + EPS  # (n, B, P, 1)
    out = h32 + num / den
    return torch.where(written[:, :, None, None], out, h32).to(h.dtype)


def memory_read_fast(h: torch.Tensor, w_q: torch.Tensor, A: torch.Tensor, z: torch.Tensor,
                     written: torch.Tensor, nu: int) -> torch.Tensor:
    """`memory_read` for fp16/bf16 h on tensor cores (module docstring); fp32 h: `memory_read` itself.

    h (n, B, P, d) fp16/bf16; w_q (n, d, d_mem) fp32; A (n, B, K, d) fp32; z (n, B, K) fp32;
    written (n, B) bool -> (n, B, P, d) in h's dtype. Rows whose memory was never written pass
    through unchanged (bit for bit)."""
    if h.dtype not in (torch.float16, torch.bfloat16):
        return memory_read(h, w_q, A, z, written, nu)
    q = dpfp(_mem_linear(h, w_q.to(h.dtype)).float(), nu)  # (n, B, P, K) f32
    qs = q / (torch.matmul(q, z[..., None]) + EPS)  # (n, B, P, K) f32
    if h.dtype == torch.bfloat16:
        num = torch.matmul(qs.to(h.dtype), A.to(h.dtype))  # (n, B, P, d) bf16
    else:
        num = torch.matmul(qs, A).to(h.dtype)  # (n, B, P, d) fp32 product, fp16 out
    return torch.where(written[:, :, None, None], h + num, h)


def memory_write(m: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_b: torch.Tensor,
                 b_b: torch.Tensor, A: torch.Tensor, z: torch.Tensor, written: torch.Tensor,
                 write: torch.Tensor, nu: int, correction: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write the memory rows' outputs into the state.

    m (n, B, M, d) any dtype; w_k (n, d, d_mem); w_v (n, d, d); w_b (n, d, 1); b_b (n, 1) fp32;
    A (n, B, K, d); z (n, B, K); written (n, B) bool; write (n, B) bool: rows that write this time.
    Returns the new (A, z, written); rows with write False keep their state bit for bit.
    """
    m32 = m.float()
    k = dpfp(_mem_linear(m32, w_k), nu)  # (n, B, M, K)
    v = _mem_linear(m32, w_v)  # (n, B, M, d)
    beta = torch.sigmoid(_mem_linear(m32, w_b) + b_b[:, None, None, :])  # (n, B, M, 1)
    kz = torch.matmul(k, z[..., None]) + EPS  # (n, B, M, 1)
    seen = written[:, :, None, None]  # (n, B, 1, 1)
    v_prev = torch.where(seen, torch.matmul(k, A) / kz, torch.zeros_like(v))
    if correction:
        gamma = torch.clamp(1 - kz / ((k * k).sum(-1, keepdim=True) + EPS), 0.0, 1.0)
        gamma = torch.where(seen, gamma, torch.ones_like(gamma))
    else:
        gamma = torch.ones_like(kz)
    delta_A = torch.matmul((k * beta).transpose(-1, -2), v - v_prev)  # (n, B, K, d)
    delta_z = (gamma * k).sum(-2)  # (n, B, K)
    w = write[:, :, None]
    return (torch.where(w[..., None], A + delta_A, A), torch.where(w, z + delta_z, z),
            written | write)
