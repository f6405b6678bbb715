from mesh_fixtures import make_mesh  # noqa: F401
