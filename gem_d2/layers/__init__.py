"""Generic building blocks with no DINO or GEM knowledge: box ops, position encodings, multi-scale
deformable attention, the channel-mapper neck, MLP/FFN, the block-wise linear class head and the segmented linear
(one weight of a stack per block of rows)."""
