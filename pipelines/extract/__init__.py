"""`cae2 extract-targets`, `verify-targets`, `convert-targets`: stage 1, the target store's writers and checks."""
