"""The library's private modules; the public API is ``jaxrnn`` (and ``jaxrnn.extend``)."""
