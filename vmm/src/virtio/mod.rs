//! virtio-mmio transport (virtio spec 1.2 §4.2) and the virtio devices behind it.
