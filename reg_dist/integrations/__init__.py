"""Adapters that describe other frameworks' sharded parameters to reg_dist (``reg_layout``)."""
