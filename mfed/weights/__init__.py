"""Models in and out of a federation: pretrained weights as a round-0 global model
(`mfed import-weights`), and the model a site deploys as one file (`mfed export`,
`mfed.load_site_model`). See docs/plugins.md."""
