"""Parts of the `cpp` backend (`codegen/cpp_backend.py`): the step graph it compiles and the
on-machine cache of compiled steps."""
