"""One file per algorithm: its constructor (hyper-parameters and defaults), checks, state and stages."""
