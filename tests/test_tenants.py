"""Tenants (issue 28): the keys file and how `relat serve` refuses a bad one; the adapter cache partitioned by
tenant and by relat.cache_salt; exported adapters only for the tenant that made them (404 to any other); the
per-tenant metrics, labelled by name and never by key."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import httpx
import pytest
from pydantic import ValidationError
from relat_server.cli import main
from relat_server.settings import Settings
from relat_server.tenants import DEFAULT, KeysFileError, TenantDirectory, parse_keys_file

from relat_core import AdapterCache, Engine

from .conftest import build_tiny
from .server_support import KEY, metrics, one_torch_thread, ready_server, sample

KEY_A, KEY_B = "sk-tenant-a-secret", "sk-tenant-b-secret"
TRAINING = {"method": "relat", "steps": 2, "latent_steps": 2, "rank": 4}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_file(tmp_path, tenants: list[dict] | str) -> str:
    path = tmp_path / "keys.json"
    path.write_text(tenants if isinstance(tenants, str) else json.dumps({"tenants": tenants}))
    return str(path)


# -- the keys file ------------------------------------------------------------------------------------------------

def test_a_keys_file_names_each_tenant_by_its_keys_digest_with_its_limits(tmp_path):
    path = keys_file(tmp_path, [{"name": "a", "key_sha256": digest(KEY_A), "max_concurrency": 2, "max_queue": 8,
                                 "requests_per_minute": 60},
                                {"name": "b", "key_sha256": digest(KEY_B).upper()}])  # hex in either case
    directory = TenantDirectory([KEY], path)
    a, b = directory.find(KEY_A.encode()), directory.find(KEY_B.encode())
    assert (a.name, a.max_concurrency, a.max_queue, a.requests_per_minute) == ("a", 2, 8, 60)
    assert (b.name, b.max_concurrency, b.max_queue, b.requests_per_minute) == ("b", None, None, None)
    assert directory.find(KEY.encode()).name == DEFAULT  # --api-key keys beside the file's tenants
    assert directory.find(b"sk-someone-else") is None
    assert [t.name for t in directory.tenants] == [DEFAULT, "a", "b"]
    assert KEY_A not in open(path).read()  # what the operator stores holds no key


@pytest.mark.parametrize(("content", "problem"), [
    ("{not json", "not JSON"),
    ([{"name": "a", "key_sha256": digest(KEY_A), "colour": "red"}], "tenants[0].colour: unknown field"),
    ([{"name": "a", "key_sha256": digest(KEY_A)}, {"name": "b", "key_sha256": digest(KEY_A)}],
     "tenants[1].key_sha256: duplicate digest"),
    ([{"name": "a", "key_sha256": digest(KEY_A)}, {"name": "a", "key_sha256": digest(KEY_B)}],
     "tenants[1].name: duplicate tenant name"),
    ([{"key_sha256": digest(KEY_A)}], "tenants[0].name"),
    ([{"name": "a b", "key_sha256": digest(KEY_A)}], "tenants[0].name"),
    ([{"name": "a", "key_sha256": digest(KEY_A), "max_queue": -1}], "tenants[0].max_queue"),
    ([{"name": "a", "key_sha256": digest(KEY_A), "requests_per_minute": "60"}], "tenants[0].requests_per_minute"),
    ([{"name": "anonymous", "key_sha256": digest(KEY_A)}], "keyless server's tenant"),
    ('{"tenant": []}', "tenants"),
])
def test_a_bad_keys_file_is_refused_naming_the_problem(tmp_path, content, problem):
    path = keys_file(tmp_path, content)
    with pytest.raises(KeysFileError, match=".*") as error:
        parse_keys_file(path)
    assert problem in str(error.value) and path in str(error.value)


@pytest.mark.parametrize("entry", [{"name": "a", "key": KEY_A}, {"name": "a", "key_sha256": KEY_A},
                                   {"name": "a", "key_sha256": digest(KEY_A)[:-1]}])
def test_a_plain_key_is_refused_with_the_line_that_makes_its_digest(tmp_path, entry):
    with pytest.raises(KeysFileError) as error:
        parse_keys_file(keys_file(tmp_path, [entry]))
    assert "plain key" in str(error.value) and 'printf %s "$KEY" | sha256sum' in str(error.value)
    assert KEY_A not in str(error.value)  # the refusal does not echo it


def test_api_keys_and_a_keys_file_together_must_not_clash(tmp_path):
    taken = keys_file(tmp_path, [{"name": DEFAULT, "key_sha256": digest(KEY_A)}])
    with pytest.raises(ValidationError, match="'default' is taken by the --api-key keys"):
        Settings(api_keys=[KEY], keys_file=taken)
    assert Settings(keys_file=taken).tenants().find(KEY_A.encode()).name == DEFAULT  # without --api-key: free
    shared = keys_file(tmp_path, [{"name": "a", "key_sha256": digest(KEY)}])
    with pytest.raises(ValidationError, match="also an --api-key key"):
        Settings(api_keys=[KEY], keys_file=shared)


def test_the_keys_file_comes_from_the_environment_too(tmp_path, monkeypatch):
    monkeypatch.setenv("RELAT_KEYS_FILE", keys_file(tmp_path, [{"name": "a", "key_sha256": digest(KEY_A)}]))
    assert Settings().tenants().find(KEY_A.encode()).name == "a"


def test_relat_serve_refuses_to_start_on_a_bad_keys_file(tmp_path, capsys):
    # Refused before the model loads (none is named here: loading the embedded one would take seconds).
    assert main(["serve", "--keys-file", keys_file(tmp_path, [{"name": "a", "key": KEY_A}])]) == 2
    err = capsys.readouterr().err
    assert "relat serve" in err and "sha256sum" in err and KEY_A not in err
    assert main(["serve", "--keys-file", keys_file(tmp_path, "[]")]) == 2
    assert "keys.json" in capsys.readouterr().err
    assert main(["serve", "--keys-file", str(tmp_path / "missing.json")]) == 2
    assert "cannot read the keys file" in capsys.readouterr().err


# -- the server ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tokenizer, tmp_path_factory):
    path = keys_file(tmp_path_factory.mktemp("keys"), [{"name": "a", "key_sha256": digest(KEY_A)},
                                                      {"name": "b", "key_sha256": digest(KEY_B)}])
    engine = Engine(build_tiny("qwen3", tokenizer, seed=7), max_rank=8, num_slots=2,
                    adapter_cache=AdapterCache(max_entries=16, max_bytes=64 << 20))
    with one_torch_thread(), ready_server(engine, keys_file=path, max_adapters=4) as served:
        served.as_a = httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=120)
        served.as_b = httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY_B}"}, timeout=120)
        yield served


def ask(client: httpx.Client, question: str, **relat) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_completion_tokens": 4,
            "relat": {**TRAINING, **relat}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def losses(answer: dict) -> list[float]:
    return [step["loss"] for step in answer["relat"]["steps"]]


def test_another_tenants_identical_request_misses_and_trains_as_any_miss(server):
    question = "Which tenant asked this first?"
    first = ask(server.as_a, question)
    assert first["relat"]["cache"] == "miss"
    other = ask(server.as_b, question)
    assert other["relat"]["cache"] == "miss"
    # The same training, run again: the partition changes nothing but where the adapter is kept.
    assert len(other["relat"]["steps"]) == TRAINING["steps"] and losses(other) == pytest.approx(losses(first))
    assert other["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert ask(server.as_a, question)["relat"]["cache"] == "hit"  # the tenant's own repeat
    assert ask(server.as_b, question)["relat"]["cache"] == "hit"
    assert server.http.post("/v1/relat", json={"question": question, "max_tokens": 4, "temperature": 0,
                                                **TRAINING}).json()["trace"]["cache"] == "miss"  # `default`


def test_two_salts_within_a_tenant_do_not_share(server):
    question = "Salted question?"
    unsalted = ask(server.as_a, question)
    first = ask(server.as_a, question, cache_salt="s1")
    second = ask(server.as_a, question, cache_salt="s2")
    assert [unsalted["relat"]["cache"], first["relat"]["cache"], second["relat"]["cache"]] == ["miss"] * 3
    assert ask(server.as_a, question, cache_salt="s1")["relat"]["cache"] == "hit"
    assert ask(server.as_b, question, cache_salt="s1")["relat"]["cache"] == "miss"  # a salt is per tenant
    native = {"question": question, "max_tokens": 4, "temperature": 0, "cache_salt": "s2", **TRAINING}
    assert server.as_a.post("/v1/relat", json=native).json()["trace"]["cache"] == "hit"  # both endpoints
    completion = {"prompt": question, "max_tokens": 2, "temperature": 0, "relat": {**TRAINING, "cache_salt": "s3"}}
    first_completion = server.as_a.post("/v1/completions", json=completion).json()
    assert first_completion["relat"]["cache"] == "miss"
    assert server.as_a.post("/v1/completions", json=completion).json()["relat"]["cache"] == "hit"


@pytest.mark.parametrize("salt", ["", "x" * 257, 3])
def test_a_bad_cache_salt_is_a_400_naming_it(server, salt):
    body = {"messages": [{"role": "user", "content": "q"}], "relat": {**TRAINING, "cache_salt": salt}}
    response = server.as_a.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "relat.cache_salt"


def test_an_adapter_is_its_tenants_alone(server):
    made = ask(server.as_a, "Keep my adapter.", return_adapter=True)["relat"]["adapter"]
    assert len(made["id"].removeprefix("adapter-")) == 32  # 128 random bits, in hex
    url = made["url"]
    unknown = "/v1/adapters/adapter-" + "0" * 32
    for stranger in (server.as_b, server.http):  # tenant b, and the --api-key keys' tenant `default`
        refused, never = stranger.get(url), stranger.get(unknown)
        assert refused.status_code == never.status_code == 404
        # The same body as an id never issued, but for the id itself: nothing says this one exists.
        assert refused.json() == json.loads(never.text.replace(unknown.rsplit("/", 1)[1], made["id"]))
    fetched = server.as_a.get(url)
    assert fetched.status_code == 200
    with zipfile.ZipFile(io.BytesIO(fetched.content)) as archive:
        assert set(archive.namelist()) == {"adapter_config.json", "adapter_model.safetensors"}


def test_an_unknown_key_is_refused(server):
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}]},
                          headers={"Authorization": "Bearer sk-nobody"})
    assert response.status_code == 401


def test_metrics_count_each_tenant_by_name_never_by_key(server):
    before = metrics(server.url)
    answers = [ask(server.as_b, f"Count me {i}.", cache=False) for i in range(2)]
    after = metrics(server.url)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("relat_tenant_requests_total", tenant="b", outcome="success") == 2
    assert grew("relat_tenant_requests_total", tenant="a", outcome="success") == 0
    assert grew("relat_tenant_tokens_total", tenant="b", kind="prompt") == sum(
        a["usage"]["prompt_tokens"] for a in answers)
    assert grew("relat_tenant_tokens_total", tenant="b", kind="completion") == sum(
        a["usage"]["completion_tokens"] for a in answers)
    trained = sum(a["relat"]["timings"]["train_s"] for a in answers)
    assert grew("relat_tenant_train_seconds_total", tenant="b") == pytest.approx(trained, rel=1e-6, abs=1e-9)
    assert grew("relat_tenant_train_seconds_total", tenant="a") == 0
    text = httpx.get(f"{server.url}/metrics").text
    assert all(key not in text and digest(key) not in text for key in (KEY, KEY_A, KEY_B))


def test_relat_ask_url_sends_the_cache_salt(server, capsys):
    flags = ["ask", "--url", server.url, "--api-key", KEY_A, "--method", "relat", "--steps", "2", "--latent-steps",
             "2", "--rank", "4", "--max-tokens", "3", "--json", "Ask with salt?"]

    def cache(*extra: str) -> str:
        assert main([*flags, *extra]) == 0
        return json.loads(capsys.readouterr().out)["trace"]["cache"]

    assert [cache("--cache-salt", "cli"), cache("--cache-salt", "cli"), cache(), cache("--cache-salt", "other")] == [
        "miss", "hit", "miss", "miss"]


def test_a_tenants_rate_limit_is_a_429_with_retry_after_and_the_other_tenant_goes_on(tokenizer, tmp_path):
    """Through HTTP, from the keys file: tenant a, at 2 requests a minute, is refused its third with a 429 that says
    when to retry; tenant b, without a limit, is served meanwhile."""
    path = keys_file(tmp_path, [{"name": "a", "key_sha256": digest(KEY_A), "requests_per_minute": 2},
                                {"name": "b", "key_sha256": digest(KEY_B)}])
    engine = Engine(build_tiny("qwen3", tokenizer, seed=7), max_rank=8, num_slots=2)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 1, "relat": {"method": "direct"}}
    with one_torch_thread(), ready_server(engine, keys_file=path) as served:
        as_a = {"Authorization": f"Bearer {KEY_A}"}
        as_b = {"Authorization": f"Bearer {KEY_B}"}
        first = [httpx.post(f"{served.url}/v1/chat/completions", json=body, headers=as_a, timeout=60) for _ in range(2)]
        assert [r.status_code for r in first] == [200, 200]
        refused = httpx.post(f"{served.url}/v1/chat/completions", json=body, headers=as_a, timeout=60)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 0 < int(refused.headers["Retry-After"]) <= 60
        others = [httpx.post(f"{served.url}/v1/chat/completions", json=body, headers=as_b, timeout=60)
                  for _ in range(4)]
        assert [r.status_code for r in others] == [200] * 4
