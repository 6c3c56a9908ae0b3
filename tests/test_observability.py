"""Observability, checked by the real tools: `promtool check metrics` on a live scrape, `promtool check/test
rules` on the alert rules, and every PromQL expression of the Grafana dashboard and the alert rules run
against a real Prometheus (Debian's `prometheus`, see .ci/install-prometheus.sh) that scrapes a real
`qwen2-cluster serve` fed with real SDK traffic. A renamed or missing metric breaks these tests.
"""

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from qwen2_client import Client, DeadlineError, OverloadedError, Qwen2Error, RetryPolicy, ValidationError
from tests.multiproc import free_port
from tests.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "helm" / "qwen2-cluster" / "files"
DASHBOARD = FILES / "grafana-dashboard.json"
RULES = FILES / "alert-rules.yaml"
RULES_TEST = FILES / "alert-rules-test.yaml"
INSTALL = ROOT / ".ci" / "install-prometheus.sh"

RATE_INTERVAL = "1m"  # what $__rate_interval stands for here: the whole short run, at a 1s scrape interval

# Expressions that may (must) return nothing after the traffic below, and why. Keys: "<panel title>/<refId>"
# for the dashboard, "alert <name>" for an alert's whole expr. Everything else must return data.
EXPECTED_EMPTY = {
    "GPU utilisation (DCGM)/A": "DCGM_FI_DEV_GPU_UTIL: no NVIDIA DCGM exporter is scraped on a CPU test machine",
    "GPU memory used (DCGM)/A": "DCGM_FI_DEV_FB_USED: no NVIDIA DCGM exporter is scraped on a CPU test machine",
    "alert Qwen2NoHealthyShards": "the shards are healthy",
    "alert Qwen2EngineNotStarted": "the engine started",
    "alert Qwen2HighTimeToFirstToken": "the tiny model's TTFT p99 is far below 10s",
    "alert Qwen2KVCacheNearFull": "the traffic uses a sliver of the KV cache",
    "alert Qwen2RequestQueueGrowing": "nothing waits once the traffic is over",
    "alert Qwen2ShardActorRestarted": "no actor restarted",
    "alert Qwen2ShardActorRestartLoop": "no actor restarted",
}
# Metric names used by the dashboard/rules that the test server cannot export (no exporter here).
FOREIGN_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"}


# -- tools --------------------------------------------------------------------------------------------------
def _can_install() -> bool:
    if not shutil.which("apt-get"):
        return False
    if os.geteuid() == 0:
        return True
    return bool(shutil.which("sudo")) and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def prom_tools() -> dict[str, str]:
    """Paths of `prometheus` and `promtool`, installing Debian's package when missing and possible."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        if not _can_install():
            pytest.fail("prometheus/promtool are not installed and this user cannot apt-get install them: run "
                        ".ci/install-prometheus.sh as root (CI does, from .ci/run)")
        out = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{INSTALL} failed:\n{out.stdout}\n{out.stderr}"
    tools = {name: shutil.which(name) for name in ("prometheus", "promtool")}
    assert all(tools.values()), f"still missing after {INSTALL}: {tools}"
    return tools


def _promtool(tools, *args, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([tools["promtool"], *args], input=stdin, capture_output=True, text=True, timeout=60,
                          cwd=cwd)


# -- the dashboard's and the rules' expressions -------------------------------------------------------------
def _load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(panels):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows (collapsed ones keep their panels inside)


def _substitute(expr: str, variables: list[str]) -> str:
    """Grafana's variables as a dashboard with every variable at 'All' sends them to Prometheus."""
    for name in ("__rate_interval", "__interval", "__range"):
        expr = re.sub(r"\$\{%s\}|\$%s\b" % (name, name), RATE_INTERVAL, expr)
    for name in variables:
        expr = re.sub(r"\$\{%s(:[a-z]+)?\}|\$%s\b" % (name, name), ".*", expr)
    assert "$" not in expr, f"unknown template variable left in {expr!r}"
    return expr


def dashboard_queries() -> dict[str, str]:
    dashboard = _load_dashboard()
    variables = [v["name"] for v in dashboard["templating"]["list"] if v["type"] != "datasource"]
    queries = {}
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            key = f"{panel['title']}/{target['refId']}"
            assert key not in queries, f"two targets are both {key}"
            queries[key] = _substitute(target["expr"], variables)
    return queries


def alert_rules() -> dict[str, dict]:
    rules = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            rules[rule["alert"]] = rule
    return rules


def _split_top_level(expr: str, words=("and", "or", "unless")) -> list[str]:
    """`A > 0 and B > 0` -> [`A > 0`, `B > 0`], splitting only outside brackets and strings."""
    parts, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            quote = None if c == quote and expr[i - 1] != "\\" else quote
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            m = re.match(r"\s(%s)\s" % "|".join(words), expr[i:])
            if m and (i == 0 or expr[i].isspace()):
                parts.append(expr[start:i])
                start = i + m.end()
                i = start
                continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts]


def alert_operands(expr: str) -> list[str]:
    """What an alert compares with its threshold: `X > 0.05` -> `X` (each operand of and/or/unless)."""
    out = []
    for part in _split_top_level(" ".join(expr.split())):
        part = re.sub(r"^(on|ignoring)\s*\([^)]*\)\s*(group_(left|right)\s*(\([^)]*\))?\s*)?", "", part)
        m = re.fullmatch(r"(.*?)\s*(?:>=|<=|==|!=|>|<)\s*(?:bool\s+)?[-+]?[0-9.eE+]+", part)
        out.append(m.group(1) if m else part)
    return out


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(qwen2_[a-z0-9_]+|DCGM_FI_[A-Z0-9_]+)\b", expr))
    return names


# -- a real server and a real Prometheus --------------------------------------------------------------------
class Prometheus:
    def __init__(self, binary: str, scrape_target: str, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "qwen2", "static_configs": [{"targets": [scrape_target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: a bad query, with Prometheus's error in the body
            return json.loads(e.read() or b"{}") | {"http_status": e.code}

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def wait_until(self, expr: str, timeout: float = 30) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.output()}")
            try:
                result = self.query(expr)
                if result.get("status") == "success" and result["data"]["result"]:
                    return result["data"]["result"]
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            time.sleep(0.2)
        raise TimeoutError(f"no data for {expr!r} after {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _sample(text: str, name: str) -> float:
    """`name` or `name{k="v"}`: the sum of its samples with those labels, whatever their others (api)."""
    metric, _, labels = name.partition("{")
    want = set(re.findall(r'(\w+)="([^"]*)"', labels))
    found = [float(value) for have, value in re.findall(r"^%s(?:\{(.*)\})? (\S+)$" % re.escape(metric), text, re.M)
             if want <= set(re.findall(r'(\w+)="([^"]*)"', have))]
    assert found, f"{name} not in the scrape"
    return sum(found)


def _traffic(target: str) -> None:
    """Real SDK traffic through every outcome: finished requests, streams, validation, deadline, overloaded,
    cancelled streams. The server runs with --max-num-seqs 2 --max-waiting 1.

    The server-side errors (deadline, overloaded) come twice, more than a scrape apart: a labelled counter
    appears at its first increment, so rate() sees only the increments after Prometheus first saw it."""
    with Client(target, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(DeadlineError):
            client.generate("slow", max_new_tokens=400, ignore_eos=True, timeout=0.3)
        for i in range(3):
            client.generate(f"Hello {i}", max_new_tokens=8, ignore_eos=True, seed=i, temperature=1.0)
        client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4)
        for _ in range(2):
            deltas = list(client.generate_stream("Stream me", max_new_tokens=6, ignore_eos=True))
            assert deltas[-1].final is not None
        with pytest.raises(ValidationError):
            client.generate("bad", temperature=-1.0)
        cancelled = client.generate_stream("cancel me", max_new_tokens=400, ignore_eos=True)
        next(iter(cancelled))
        cancelled.cancel()

        # Two running (max_num_seqs=2) and one waiting (max_waiting=1) fill the queue: the next is refused.
        holders = [client.generate_stream("hold", max_new_tokens=2000, ignore_eos=True) for _ in range(3)]

        def read(stream):
            try:
                for _ in stream:
                    pass
            except Qwen2Error:
                pass  # cancelled below

        readers = [threading.Thread(target=read, args=(h,), daemon=True) for h in holders]
        for r in readers:
            r.start()
            time.sleep(0.3)  # one at a time: the first two are running before the third queues
        time.sleep(1.0)  # a scrape with requests running and waiting
        for _ in range(2):
            with pytest.raises(OverloadedError):
                client.generate("one too many", max_new_tokens=2)
            time.sleep(1.5)
        for h in holders:
            h.cancel()
        for r in readers:
            r.join(20)
        with pytest.raises(DeadlineError):
            client.generate("slow again", max_new_tokens=400, ignore_eos=True, timeout=0.3)


@pytest.fixture(scope="module")
def stack(prom_tools, tmp_path_factory):
    """serve (TP=1, the built-in demo checkpoint) + Prometheus scraping it every second, after traffic."""
    cache = tmp_path_factory.mktemp("cache")
    work = tmp_path_factory.mktemp("prometheus")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    server = prometheus = None
    try:
        server = ServerProcess(None, "--max-num-seqs", "2", "--max-waiting", "1", tp=1)
        args = server.proc.args
        metrics_url = f"http://127.0.0.1:{args[args.index('--metrics-port') + 1]}/metrics"
        prometheus = Prometheus(prom_tools["prometheus"], metrics_url.split("/")[2], work)
        server.wait_serving()
        prometheus.wait_until('up{job="qwen2"} == 1')  # scraped at least once before the traffic
        _traffic(server.target)
        scrape = _scrape(metrics_url)
        # Wait until Prometheus holds the final counts (the last requests finished before this scrape).
        received = _sample(scrape, "qwen2_requests_received_total")
        generated = _sample(scrape, "qwen2_generation_tokens_total")
        prometheus.wait_until(f"sum(qwen2_requests_received_total) == {received}")
        prometheus.wait_until(f"qwen2_generation_tokens_total >= {generated}")
        prometheus.wait_until("qwen2_waiting_requests == 0 and qwen2_running_requests == 0")
        time.sleep(2)  # a couple more scrapes after the traffic, and rule evaluations
        yield {"server": server, "prometheus": prometheus, "metrics_url": metrics_url, "scrape": scrape}
    finally:
        os.environ.pop("XDG_CACHE_HOME", None)
        if prometheus is not None:
            prometheus.stop()
        if server is not None:
            server.stop()


# -- tests ----------------------------------------------------------------------------------------------------
def test_promtool_check_metrics_on_a_live_scrape(stack, prom_tools):
    scrape = _scrape(stack["metrics_url"])
    out = _promtool(prom_tools, "check", "metrics", stdin=scrape)
    assert out.returncode == 0, f"promtool check metrics:\n{out.stdout}{out.stderr}"
    # The traffic reached every outcome the dashboard breaks down.
    for kind, n in (("validation", 1), ("deadline", 2), ("overloaded", 2), ("cancelled", 4)):
        assert _sample(scrape, f'qwen2_requests_failed_total{{kind="{kind}"}}') >= n, kind
    assert _sample(scrape, 'qwen2_requests_finished_total{finish_reason="length"}') >= 5


def test_promtool_check_rules(prom_tools):
    out = _promtool(prom_tools, "check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def test_promtool_test_rules(prom_tools):
    out = _promtool(prom_tools, "test", "rules", RULES_TEST.name, cwd=FILES)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
    tested = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert len(tested) >= 2 and tested <= set(alert_rules())


def test_alert_rules_are_complete():
    rules = alert_rules()
    for name, rule in rules.items():
        assert rule.get("for"), f"{name} has no `for:`"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    used = " ".join(r["expr"] for r in rules.values())
    for metric in ("qwen2_healthy_shards", "qwen2_requests_failed_total", "qwen2_time_to_first_token_seconds_bucket",
                   "qwen2_kv_cache_usage_ratio", "qwen2_waiting_requests", "qwen2_actor_restarts_total"):
        assert metric in used, f"no alert on {metric}"


def test_dashboard_is_a_grafana_dashboard():
    dashboard = _load_dashboard()
    assert dashboard["title"] == "qwen2-cluster" and dashboard["uid"] and 36 <= dashboard["schemaVersion"] <= 41
    (ds,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert ds["name"] == "datasource" and ds["query"] == "prometheus"
    panels = list(_panels(dashboard["panels"]))
    ids, titles = [p["id"] for p in panels], [p["title"] for p in panels if p["type"] != "row"]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip(), panel["title"]
    queries = " ".join(dashboard_queries().values())
    for metric in ("qwen2_time_to_first_token_seconds_bucket", "qwen2_inter_token_latency_seconds_bucket",
                   "qwen2_e2e_request_latency_seconds_bucket", "qwen2_prompt_tokens_total",
                   "qwen2_generation_tokens_total", "qwen2_running_requests", "qwen2_waiting_requests",
                   "qwen2_kv_cache_usage_ratio", "qwen2_preemptions_total", "qwen2_batch_size_bucket",
                   "qwen2_batch_tokens_bucket", "qwen2_stage_forward_seconds_bucket", "qwen2_healthy_shards",
                   "qwen2_actor_restarts_total", "qwen2_step_phase_seconds_bucket", "qwen2_requests_failed_total",
                   "qwen2_requests_finished_total", "qwen2_prefix_cache_hit_tokens_total",
                   "qwen2_prefix_cache_query_tokens_total", "qwen2_engine_failures_total", "qwen2_engine_loop_running",
                   "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"):
        assert metric in queries, f"the dashboard does not show {metric}"


def test_alert_operands_are_split_as_expected():
    assert alert_operands("max by (a) (x) < 1") == ["max by (a) (x)"]
    assert alert_operands('sum(rate(x{k!~"a and b"}[5m])) > 0\n and sum(deriv(y[10m])) > 0') == [
        'sum(rate(x{k!~"a and b"}[5m]))', "sum(deriv(y[10m]))"]
    assert alert_operands("max by (j) (x) < 1 and on (j) max by (j) (y) >= 3") == ["max by (j) (x)", "max by (j) (y)"]


def test_every_dashboard_and_alert_expression_runs_on_prometheus(stack):
    prometheus: Prometheus = stack["prometheus"]
    checks = {k: v for k, v in dashboard_queries().items()}
    for name, rule in alert_rules().items():
        checks[f"alert {name}"] = rule["expr"]
        for i, operand in enumerate(alert_operands(rule["expr"])):  # what the threshold is compared with
            checks[f"alert {name} operand {i}"] = operand
    assert set(EXPECTED_EMPTY) <= set(checks), f"stale EXPECTED_EMPTY keys: {set(EXPECTED_EMPTY) - set(checks)}"

    failures = []
    for key, expr in checks.items():
        result = prometheus.query(expr)
        if result.get("status") != "success":
            failures.append(f"{key}: does not run: {result.get('error')}\n    {expr}")
        elif key in EXPECTED_EMPTY and result["data"]["result"]:
            failures.append(f"{key}: expected no data ({EXPECTED_EMPTY[key]}), got {result['data']['result']}")
        elif key not in EXPECTED_EMPTY and not result["data"]["result"]:
            failures.append(f"{key}: no data after the traffic\n    {expr}")
    assert not failures, "\n".join(failures)

    # Every metric name used anywhere exists on the server, even where an expression may be empty.
    exported = set(prometheus.api("label/__name__/values")["data"])
    used = set().union(*(metric_names(e) for e in checks.values()))
    missing = {m for m in used - exported if m not in FOREIGN_METRICS}
    assert not missing, f"the dashboard/alerts use metrics the server does not export: {sorted(missing)}"


def test_dashboard_variables_resolve(stack):
    prometheus: Prometheus = stack["prometheus"]
    for var in _load_dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
        assert m, var["definition"]
        selector = _substitute(m.group(1), ["job", "instance"])
        values = prometheus.api(f"label/{m.group(2)}/values", **{"match[]": selector})
        assert values["status"] == "success", (var["name"], values)
        if not metric_names(selector) <= FOREIGN_METRICS:
            assert values["data"], f"variable {var['name']} has no values"


def test_alert_rules_load_and_evaluate_in_prometheus(stack):
    prometheus: Prometheus = stack["prometheus"]
    groups = prometheus.api("rules")["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == set(alert_rules())
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    # The traffic had server-side errors (deadline, overloaded) well above 5% of requests.
    assert rules["Qwen2HighErrorRatio"]["state"] in ("pending", "firing")
    assert all(rules[n]["state"] == "inactive" for n in rules if f"alert {n}" in EXPECTED_EMPTY)
