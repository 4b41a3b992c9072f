"""
Multi-scale deformable attention (Deformable-DETR, Zhu et al. 2021): the op, not the module.

For every query q and head m, the output is a weighted sum of bilinear samples of the value map:

    out[n, q, m] = sum_{l, p} A[n, q, m, l, p] * bilinear(value[n, level l, m], loc[n, q, m, l, p])

with loc a normalised (x, y) in [0, 1] of level l's (padded) map, the pixel centre convention of
grid_sample(align_corners=False): pixel = loc * W - 0.5, and zero outside the map.

Two implementations with the same semantics:
  - ms_deform_attn_reference: pure PyTorch (F.grid_sample), runs anywhere, the test oracle.
  - the CUDA op in csrc/, compiled on first use with torch.utils.cpp_extension.load and cached by torch under
    ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR). fp32/fp16/bf16 values with fp32 accumulation, fp64 for
    gradcheck. If it cannot be built (no nvcc, say) we say why once and fall back to the reference.

They differ on non-finite locations only: the CUDA op takes a NaN or inf location as off the map (zero output and
gradients), the reference gives NaN.

ms_deform_attn() picks the CUDA op for CUDA tensors (whose images fit its 32-bit offsets: fits_op) and the reference
otherwise.
"""

import os
import shutil
import warnings

import torch
import torch.nn.functional as F

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_op = None          # the compiled extension module, once built
_op_failed = None   # the reason it could not be built, once tried


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """
    value: (N, S, M, D) with S = sum_l H_l * W_l, levels concatenated, each row-major
    spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64 (unused: derived from the shapes)
    sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y)
    attention_weights: (N, Lq, M, L, P)
    returns: (N, Lq, M * D)
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    # fp16/bf16 values are sampled in fp32, as the CUDA op does: a bf16 location is off by up to a pixel on large maps
    dtype = torch.promote_types(value.dtype, torch.float32)
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    grids = 2 * sampling_locations.to(dtype) - 1  # grid_sample wants [-1, 1]
    samples = []
    for lvl, (v, (H, W)) in enumerate(zip(value.to(dtype).split(sizes, dim=1), spatial_shapes.tolist())):
        v = v.permute(0, 2, 3, 1).reshape(N * M, D, H, W)                         # (N*M, D, H, W)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(N * M, Lq, P, 2)         # (N*M, Lq, P, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    samples = torch.stack(samples, dim=-2).flatten(-2)                           # (N*M, D, Lq, L*P)
    attn = attention_weights.to(dtype).transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (samples * attn).sum(-1)                                               # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).to(value.dtype).contiguous()


def _find_cuda_home():
    """The CUDA toolkit folder (with include/cuda_runtime.h), or None.

    torch guesses it from the folder of `nvcc` on PATH, which is wrong when that nvcc is a wrapper script (as on our
    CI machine: /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc), so we check the candidates ourselves.
    """
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def load_op(verbose=False):
    """Compile (first time) and load the CUDA extension. Returns the module, or None with a warning saying why."""
    global _op, _op_failed
    if _op is not None or _op_failed is not None:
        return _op
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        _op_failed = "no CUDA toolkit found (nvcc and include/cuda_runtime.h); set CUDA_HOME"
    else:
        os.environ["CUDA_HOME"] = cuda_home
        import torch.utils.cpp_extension as cpp_extension
        cpp_extension.CUDA_HOME = cuda_home  # in case it was imported before with a wrong guess
        # Build for the GPUs we can see (or $TORCH_CUDA_ARCH_LIST); on a machine without one (CI) for Hopper, so that
        # compilation is still tested there. A visible GPU is never required to compile. An explicit -gencode
        # replaces torch's own arch flags.
        arch = []
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            arch = ["-gencode=arch=compute_90,code=sm_90"]
        try:
            _op = cpp_extension.load(
                name="richsem_msda",
                sources=[os.path.join(_CSRC, "msda.cpp"), os.path.join(_CSRC, "msda_cuda.cu")],
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"] + arch, verbose=verbose)
        except Exception as e:  # a compiler error is long: keep its tail, which names the cause
            _op_failed = f"building csrc/ failed: {str(e)[-2000:]}"
    if _op_failed is not None:
        warnings.warn(f"MSDeformAttn CUDA op unavailable ({_op_failed}); using the (slower) PyTorch reference.")
    return _op


# The CUDA op as a torch.library custom op, for torch.compile (train.py --compile): it sees one opaque node with a
# known output shape instead of breaking its graph at an extension call. Eager runs take _EagerMSDA (below). The
# kernels are looked up at call time, so importing this file never builds anything.
@torch.library.custom_op("richsem::msda_forward", mutates_args=(), device_types="cuda")
def _forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
             sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    return _op.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_forward.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


@torch.library.custom_op("richsem::msda_backward", mutates_args=(), device_types="cuda")
def _backward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
              sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
              grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_value, grad_loc, grad_attn = _op.backward(value, spatial_shapes, level_start_index, sampling_locations,
                                                   attention_weights, grad_output.contiguous())
    return grad_value, grad_loc, grad_attn


@_backward.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grads(ctx, grad_output):
    grad_value, grad_loc, grad_attn = _backward(*ctx.saved_tensors, grad_output)
    return grad_value, None, None, grad_loc, grad_attn


_forward.register_autograd(_grads, setup_context=_save_inputs)


class _EagerMSDA(torch.autograd.Function):
    """The same kernels for eager runs, without the custom ops' dispatch: that costs about 0.3 ms of host time per
    forward + backward, more than the GPU's 0.1 ms at the decoder's shape (H200, bench.py msda: decoder fwd+bwd 0.40
    -> 0.22 ms, host-bound before)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return _op.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_value, grad_loc, grad_attn = _op.backward(*ctx.saved_tensors, grad_output.contiguous())
        return grad_value, None, None, grad_loc, grad_attn


def fits_op(value):
    """Whether the CUDA op's 32-bit offsets within one image cover value (N, S, M, D): with room for a corner one row
    below the last token, (2 S + 1) M D < 2^31, so just under 2^30 elements an image (2 GiB of bf16)."""
    if value.dim() != 4:  # the op's own check names the fault
        return True
    _, S, M, D = value.shape
    return (2 * S + 1) * M * D < 2 ** 31


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Same arguments and result as ms_deform_attn_reference; the CUDA op when the tensors are on a GPU (and one
    image's value fits its offsets, else the reference, with a warning)."""
    if value.is_cuda and not fits_op(value):
        warnings.warn(f"msda: one image's value has {value.shape[1:].numel()} elements, more than the CUDA op's 32-bit "
                      "offsets take (below 2^30); using the (slower) PyTorch reference.")
    # `_op is not None` first: under torch.compile the built op is then a constant and load_op is never traced.
    elif value.is_cuda and (_op is not None or load_op() is not None):
        # Locations and weights stay fp32 even under autocast: an fp16/bf16 location is off by up to a pixel on
        # large maps. The kernel reads value in its own dtype and accumulates in fp32.
        dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        sampling_locations, attention_weights = sampling_locations.to(dtype), attention_weights.to(dtype)
        op = _forward if torch.compiler.is_compiling() else _EagerMSDA.apply  # compiled: one opaque graph node
        return op(value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                  sampling_locations.contiguous(), attention_weights.contiguous())
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
