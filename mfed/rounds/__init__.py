"""A site's round and the federation's first model: the trainer Job and the pilot run this code.

`site_round.run_site_round` is one site's round (read the global model, train, upload),
`start.assemble_start` the model a site starts from (per its SiteStrategy), `initial` the
round-0 global model. The Job entrypoint (`mfed_trainer`) only parses its spec and calls these.
"""
