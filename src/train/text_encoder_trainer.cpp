#include "train/text_encoder_trainer.h"

#include "core/error.h"
#include "io/tensor_file.h"
#include "models/name_map.h"
#include "pipeline/conditioning.h"

namespace diffuse::train {

TextEncoderTrainer::TextEncoderTrainer(SDModel& model, Grads& grads) : model_(model), xl_(model.family == Family::SDXL) {
  DF_CHECK(model.te.loaded() && (!xl_ || (model.has_te2 && model.te2.loaded())), model.path,
           ": text-encoder training needs the model's text encoder", xl_ ? "s (both)" : "", " loaded");
  const TensorFile f = open_model_file(model.path);
  register_layers(grads, model.te.prepared(), model.te.norms(), component_weights(f, Component::TextEncoder, model.family));
  if (xl_)
    register_layers(grads, model.te2.prepared(), model.te2.norms(),
                    component_weights(f, Component::TextEncoder2, model.family));
}

void TextEncoderTrainer::add_caption(Batch& b, const std::string& caption) const {
  const std::vector<WeightedText> runs = {{caption, 1.0f}};  // captions are plain text (no A1111 weights)
  b.ids1.push_back(chunk_weighted(runs, pad_token(model_.family, 0)).front().ids);
  if (xl_) b.ids2.push_back(chunk_weighted(runs, pad_token(model_.family, 1)).front().ids);
}

TextEncoderTrainer::Encoded TextEncoderTrainer::forward(Ctx& c, const Batch& b) {
  DF_CHECK(c.grads, "text-encoder training: forward needs a training context (Ctx::grads)");
  tr1_ = ClipTextModel::Trace(), tr2_ = ClipTextModel::Trace();
  Encoded e;
  if (!xl_) {
    e.context = model_.te.forward_train(c, b.ids1, 0, tr1_).last_hidden;
    return e;
  }
  DF_CHECK(b.ids2.size() == b.ids1.size(), "text-encoder training: ", b.ids1.size(), " captions for encoder 1 but ",
           b.ids2.size(), " for encoder 2");
  const Tensor h1 = model_.te.forward_train(c, b.ids1, 0, tr1_).penultimate;
  const ClipTextModel::Output o2 = model_.te2.forward_train(c, b.ids2, 0, tr2_);
  DF_CHECK(o2.text_embeds.defined(), model_.path, ": SDXL text encoder 2 has no text_projection");
  e.context = Tensor::empty({h1.dim(0), h1.dim(1), h1.dim(2) + o2.penultimate.dim(2)});
  c.be.concat_last(h1, o2.penultimate, e.context);
  e.pooled = o2.text_embeds;
  return e;
}

void TextEncoderTrainer::backward(Ctx& c, const Tensor& dcontext, const Tensor& dpooled) {
  if (!xl_) {
    model_.te.backward(c, tr1_, dcontext, Tensor(), Tensor());
    return;
  }
  const Tensor& h1 = tr1_.out.penultimate;
  const Tensor& h2 = tr2_.out.penultimate;
  DF_CHECK(h1.defined() && h2.defined(), "text-encoder training: backward without a forward");
  DF_CHECK(dcontext.rank() == 3 && dcontext.dim(2) == h1.dim(2) + h2.dim(2), "text-encoder training: dcontext ",
           dcontext.str(), " does not have ", h1.dim(2), " + ", h2.dim(2), " channels");
  Tensor d1 = Tensor::empty(h1.shape()), d2 = Tensor::empty(h2.shape());
  c.be.split_last(dcontext, d1, d2);
  model_.te.backward(c, tr1_, Tensor(), d1, Tensor());
  model_.te2.backward(c, tr2_, Tensor(), d2, dpooled);
}

}  // namespace diffuse::train
