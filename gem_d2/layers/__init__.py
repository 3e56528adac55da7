"""Generic building blocks with no DINO or GEM knowledge: box ops, position encodings, multi-scale
deformable attention, the channel-mapper neck, MLP/FFN and the block-wise linear class head."""
