"""Container networking on this node: plan (pure), execute, segment drivers, and the
parts the controller composes (address book, port batcher, dirty tracker, sweep)."""
