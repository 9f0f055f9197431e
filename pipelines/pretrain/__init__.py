"""`cae2 pretrain` and `cae2 export`: stage 2, training a student on the target store, and its encoder for timm."""
