def pytest_configure(config):
    # Registered here too so that running this folder directly (not through nox, which passes
    # the marker with -o) does not warn about an unknown mark.
    config.addinivalue_line("markers", "gpu: needs an accelerator (run on a GPU machine)")
