"""What the test files share: builders of tiny models, images and data sets, shrunk configs and tasks, and the
workspace that runs `python run.py` as a user types it. Test files import from here, never from each other;
tests/conftest.py holds the fixtures (which call these) and the hooks."""
