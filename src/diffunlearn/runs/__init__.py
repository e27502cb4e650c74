"""One module per run kind (DESIGN.md): `resolve` (configs, profiles, run ids, run directories;
torch-free), `erase`, `attack`, `evaluate`, `report`; `common` holds what they share."""
