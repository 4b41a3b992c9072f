// Python bindings and argument checks of the multi-scale deformable attention op (kernels in msda_cuda.cu).
#include <torch/extension.h>
#include <string>
#include <vector>

at::Tensor msda_forward_cuda(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                             const at::Tensor& loc, const at::Tensor& attn);
std::vector<at::Tensor> msda_backward_cuda(const at::Tensor& value, const at::Tensor& shapes,
                                           const at::Tensor& starts, const at::Tensor& loc,
                                           const at::Tensor& attn, const at::Tensor& grad_out);

namespace {

// Numbers in the messages below go through std::to_string, not through the stream that TORCH_CHECK builds its
// message with: on the H200 machine (torch 2.11 wheel, the extension built by Ubuntu's g++ 13.3) streaming an integer
// from this library segfaulted inside std::ostream's number formatting (cuda-gdb: basic_ostream::_M_insert<long>
// calling into a wrong locale facet), so a wrong shape crashed the process instead of raising. There ldd lists no
// libstdc++ for the built extension, so its C++ runtime symbols bind to whichever copy is loaded: a likely mix.
// Strings and c10's own printers (dtype, device) were fine.
std::string str(int64_t x) { return std::to_string(x); }

std::string str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

// Every way a caller can get the arguments wrong, caught here with a message rather than as a wrong result or an
// illegal memory access inside the kernel, but one: the values of spatial_shapes and level_start_index, which live on
// the GPU, where reading them would cost a host sync per call. The kernels assume H, W >= 0, sum(H * W) == S and
// level_start_index the running sum of H * W, as the module builds them (ms_deform_attn_reference checks the sum).
// None of the checks needs a GPU, so that all can be tested on meta tensors; the device comes last (check_on_gpu).
void check_args(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts, const at::Tensor& loc,
                const at::Tensor& attn) {
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"value", &value}, {"spatial_shapes", &shapes}, {"level_start_index", &starts}, {"sampling_locations", &loc},
      {"attention_weights", &attn}};
  for (const auto& [name, t] : inputs) {
    TORCH_CHECK(t->device() == value.device(), "msda: all inputs must be on ", value.device(), ", got ", name, " on ",
                t->device());
    TORCH_CHECK(t->is_contiguous(), "msda: ", name, " must be contiguous");
  }
  TORCH_CHECK(value.dim() == 4, "msda: value must be (N, S, M, D), got ", str(value.sizes()));
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2, "msda: sampling_locations must be (N, Lq, M, L, P, 2), got ",
              str(loc.sizes()));
  TORCH_CHECK(attn.dim() == 5, "msda: attention_weights must be (N, Lq, M, L, P), got ", str(attn.sizes()));
  const int64_t N = value.size(0), M = value.size(2), L = loc.size(3);
  TORCH_CHECK(loc.size(0) == N && loc.size(2) == M, "msda: sampling_locations ", str(loc.sizes()),
              " do not match value ", str(value.sizes()));
  TORCH_CHECK(attn.sizes() == loc.sizes().slice(0, 5), "msda: attention_weights ", str(attn.sizes()),
              " do not match sampling_locations ", str(loc.sizes()));
  TORCH_CHECK(shapes.scalar_type() == at::kLong && shapes.dim() == 2 && shapes.size(0) == L && shapes.size(1) == 2,
              "msda: spatial_shapes must be int64 (L, 2) with L = ", str(L), ", got ", shapes.scalar_type(), " ",
              str(shapes.sizes()));
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.dim() == 1 && starts.size(0) == L,
              "msda: level_start_index must be int64 (L,) with L = ", str(L), ", got ", starts.scalar_type(), " ",
              str(starts.sizes()));
  // What the kernels' index arithmetic assumes: offsets within one image's value in 32 bits (with room for a corner
  // one row below the last token), query blocks within the grid's x limit, and exact level_of (msda_cuda.cu).
  const int64_t S = value.size(1), D = value.size(3), Lq = loc.size(1), P = loc.size(4);
  TORCH_CHECK((2 * S + 1) * M * D < (int64_t(1) << 31), "msda: one image's value has too many elements (S * M * D = ",
              str(S * M * D), ", must be below 2^30)");
  TORCH_CHECK(Lq < (int64_t(1) << 34), "msda: too many queries (", str(Lq), ")");
  TORCH_CHECK(P < 46341 && L < (int64_t(1) << 31) && L * P * P < (int64_t(1) << 31),
              "msda: too many levels and points (L = ", str(L), ", P = ", str(P), "; L * P * P must be below 2^31)");
  const auto expect = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(loc.scalar_type() == expect && attn.scalar_type() == expect,
              "msda: sampling_locations and attention_weights must be ", expect, " for a ", value.scalar_type(),
              " value, got ", loc.scalar_type(), " and ", attn.scalar_type());
}

void check_on_gpu(const at::Tensor& value) { TORCH_CHECK(value.is_cuda(), "msda: value must be a CUDA tensor"); }

at::Tensor forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts, const at::Tensor& loc,
                   const at::Tensor& attn) {
  check_args(value, shapes, starts, loc, attn);
  check_on_gpu(value);
  return msda_forward_cuda(value, shapes, starts, loc, attn);
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                 const at::Tensor& loc, const at::Tensor& attn, const at::Tensor& grad_out) {
  check_args(value, shapes, starts, loc, attn);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == value.scalar_type() &&
                  grad_out.device() == value.device(),
              "msda: grad_output must be a contiguous ", value.scalar_type(), " tensor on ", value.device());
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == value.size(0) && grad_out.size(1) == loc.size(1) &&
                  grad_out.size(2) == value.size(2) * value.size(3),
              "msda: grad_output must be (N, Lq, M * D), got ", str(grad_out.sizes()));
  check_on_gpu(value);
  return msda_backward_cuda(value, shapes, starts, loc, attn, grad_out);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "multi-scale deformable attention, forward (CUDA)");
  m.def("backward", &backward, "multi-scale deformable attention, backward (CUDA): grad value, locations, weights");
}
