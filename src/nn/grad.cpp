#include "nn/grad.h"

#include "core/error.h"

namespace diffuse {

void register_layers(Grads& g, const PreparedIndex& prepared, const NormIndex& norms, const WeightStore& store,
                     DType weights) {
  for (const auto& [name, e] : prepared) {
    const Tensor* w = store.find(name);
    DF_CHECK(w != nullptr, store.origin(), ": ", name, " is not in the model file the layers were loaded from");
    LayerParams p;
    p.name = name;
    p.w = w->to(weights).reshape(e.prepared_shape);
    if (e.bias) {
      const std::string bn = name.substr(0, name.size() - 6) + "bias";  // "<module>.weight" -> "<module>.bias"
      const Tensor* b = store.find(bn);
      DF_CHECK(b != nullptr, store.origin(), ": ", bn, " is not in the model file the layers were loaded from");
      p.b = b->to(DType::F32);
    }
    g.layers[e.w.get()] = std::move(p);
  }
  for (const auto& [name, n] : norms) g.norms[n.gamma.data()] = NormParams{name, {}, {}};
}

}  // namespace diffuse
