// Argument checks shared by the CPU and CUDA kernels of one schema (csrc/schemas.cpp). The dispatcher
// picks the kernel by device, so these check that every tensor is on the first one's device, not which
// device that is. Limits that only one device's kernels have stay in that file.
#pragma once

#include <torch/extension.h>

#include <initializer_list>
#include <optional>
#include <vector>

namespace council_fast {
namespace checks {

inline void same_device(const char* op, const at::Tensor& first, std::initializer_list<const at::Tensor*> others) {
  for (const at::Tensor* t : others)
    TORCH_CHECK(t->device() == first.device(), op, ": every tensor must be on ", first.device(), ", got one on ",
                t->device());
}

// H and W of a (B, C, H, W) tensor merge into one pixel stride (NCHW and channels_last both qualify).
inline void pixels_merge(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == t.size(3) * t.stride(3), op, ": ", name,
              " must have H and W merged into one pixel stride (NCHW or channels_last)");
}

// ---- AdaIN: x (B, C, H, W) contiguous; weight, bias and the statistics B*C contiguous fp32 values.

inline void adain_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "adain: x must be a contiguous (B, C, H, W) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "adain: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t planes = x.size(0) * x.size(1);
  same_device("adain", x, {&weight, &bias});
  for (const at::Tensor* t : {&weight, &bias})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == planes,
                "adain: weight and bias must be contiguous float32 with B*C = ", planes, " values");
}

// t (an input or an output) is contiguous with like's shape, dtype and device.
inline void adain_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device() && t.is_contiguous() && t.sizes() == like.sizes() &&
                  t.scalar_type() == like.scalar_type(),
              "adain: ", name, " must be contiguous on ", like.device(), " with shape ", like.sizes(), " and dtype ",
              like.scalar_type());
}

// Every operand of the AdaIN forward: x, weight, bias as adain_inputs; y like x; mean and rstd like weight.
inline void adain_forward_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               const std::optional<at::Tensor>& residual, const at::Tensor& y, const at::Tensor& mean,
                               const at::Tensor& rstd) {
  adain_inputs(x, weight, bias);
  adain_like(y, x, "y");
  adain_like(mean, weight, "mean");
  adain_like(rstd, weight, "rstd");
  if (residual.has_value()) adain_like(*residual, x, "residual");
}

// Every operand of the AdaIN backward: dy and dx like x; the statistics and the parameter gradients like weight.
inline void adain_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                                const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias) {
  adain_inputs(x, weight, bias);
  adain_like(dy, x, "dy");
  adain_like(mean, weight, "mean");
  adain_like(rstd, weight, "rstd");
  adain_like(dx, x, "dx");
  adain_like(dweight, weight, "dweight");
  adain_like(dbias, weight, "dbias");
}

// ---- Decoder tail: h (B, dim, H, W), images (B, O, H, W), w1/w2 (dim, dim), w3 ((O + 1) * M, dim).

inline void decoder_tail_inputs(const at::Tensor& h, const at::Tensor& w1, const at::Tensor& b1,
                                const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
                                const at::Tensor& b3, const at::Tensor& images, int64_t num_masks) {
  same_device("decoder_tail", h, {&w1, &b1, &w2, &b2, &w3, &b3, &images});
  TORCH_CHECK(h.dim() == 4 && images.dim() == 4, "decoder_tail: h and images must be 4-D");
  TORCH_CHECK(images.scalar_type() == h.scalar_type(), "decoder_tail: images must have h's dtype");
  TORCH_CHECK(num_masks >= 1 && num_masks <= 64, "decoder_tail: num_masks must be in 1..64");
  TORCH_CHECK(images.size(1) >= 1 && images.size(1) <= 8, "decoder_tail: output_dim must be in 1..8");
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) == h.size(1) && w1.size(1) == h.size(1), "decoder_tail: w1 shape");
  TORCH_CHECK(w3.dim() == 2 && w3.size(0) == (images.size(1) + 1) * num_masks && w3.size(1) == h.size(1),
              "decoder_tail: w3 must be ((output_dim + 1) * num_masks, dim)");
  pixels_merge("decoder_tail", h, "h");
  pixels_merge("decoder_tail", images, "images");
}

inline void decoder_tail_outputs(const at::Tensor& h, const at::Tensor& images, int64_t num_masks,
                                 const at::Tensor& out, const at::Tensor& masks) {
  const std::vector<int64_t> out_shape{h.size(0), images.size(1), h.size(2), h.size(3)};
  const std::vector<int64_t> mask_shape{h.size(0), num_masks, h.size(2), h.size(3)};
  same_device("decoder_tail", h, {&out, &masks});
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape) && out.is_contiguous() && out.scalar_type() == h.scalar_type(),
              "decoder_tail: out must be a contiguous (B, output_dim, H, W) tensor of h's dtype");
  TORCH_CHECK(masks.sizes() == at::IntArrayRef(mask_shape) && masks.is_contiguous() &&
                  masks.scalar_type() == h.scalar_type(),
              "decoder_tail: masks must be a contiguous (B, num_masks, H, W) tensor of h's dtype");
}

inline void decoder_tail_grads(const at::Tensor& h, const at::Tensor& images, const at::Tensor& grad_out,
                               const c10::optional<at::Tensor>& grad_masks, const at::Tensor& grad_h,
                               const at::Tensor& grad_img) {
  same_device("decoder_tail", h, {&grad_out, &grad_h, &grad_img});
  if (grad_masks.has_value()) same_device("decoder_tail", h, {&grad_masks.value()});
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == h.size(0) && grad_out.size(1) == images.size(1) &&
                  grad_out.size(2) == h.size(2) && grad_out.size(3) == h.size(3),
              "decoder_tail: grad_out must have the output's shape");
  if (grad_masks.has_value())
    TORCH_CHECK(grad_masks->dim() == 4 && grad_masks->size(0) == h.size(0) && grad_masks->size(2) == h.size(2) &&
                    grad_masks->size(3) == h.size(3),
                "decoder_tail: grad_masks must have the masks' shape");
  TORCH_CHECK(grad_h.sizes() == h.sizes() && grad_h.scalar_type() == h.scalar_type() &&
                  grad_img.sizes() == images.sizes() && grad_img.scalar_type() == images.scalar_type(),
              "decoder_tail: grad_h / grad_images must match h / images");
  pixels_merge("decoder_tail", grad_h, "grad_h");
  pixels_merge("decoder_tail", grad_img, "grad_images");
}

}  // namespace checks
}  // namespace council_fast
