"""`cae2 evaluate`: measures of an encoder (k-NN, linear probes) on labelled images."""
