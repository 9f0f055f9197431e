"""Stage 1 building blocks: view parameters and their exact re-application, the frozen CLIP teacher,
and the Zarr target store. Imports cae2 at most."""
