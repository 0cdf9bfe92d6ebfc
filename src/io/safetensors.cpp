// placeholder, replaced by the safetensors reader
