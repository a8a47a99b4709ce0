from tests.assess.conftest import tiny_model  # noqa: F401 - the tiny BERT model folder fixture
