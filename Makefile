# The two commands a newcomer needs:
#   make run    the whole local stack (MongoDB, Redis, sink, API, scheduler, 10 mock messages)
#   make test   the whole test suite: format, lints, every test against real servers, the
#               Postman collection with newman against a live stack, schemathesis fuzzing of both
#               APIs, the operator console in headless Chromium, compose validation, the
#               Kubernetes manifests rendered and schema-validated, the compose stack run
#               for real, and the chaos campaign (shortened)
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: run test services services-down fmt-check lint unit-tests newman fuzz console-test screenshots compose-check k8s-check compose-up-test chaos chaos-short openapi bench bench-feed bench-scale bench-campaign

run:
	build/run-local.sh

test: services fmt-check lint unit-tests newman fuzz console-test compose-check k8s-check compose-up-test chaos-short

services:
	build/local-services.sh up

services-down:
	build/local-services.sh down

fmt-check:
	cargo fmt --all -- --check

lint:
	cargo clippy --all-targets -- -D warnings

unit-tests:
	@if command -v cargo-nextest >/dev/null; then \
		cargo nextest run --workspace --no-fail-fast; \
	else \
		cargo test --workspace --no-fail-fast; \
	fi

newman:
	build/newman.sh

# schemathesis against both OpenAPI documents on a live stack (FUZZ_EXAMPLES, FUZZ_SEED).
fuzz:
	build/fuzz.sh

console-test:
	build/console-test.sh

# The console test, saving its screenshots as the README's pictures (docs/screenshots/).
screenshots:
	CONSOLE_SCREENSHOTS=$(CURDIR)/docs/screenshots build/console-test.sh

compose-check:
	build/check-compose.sh

# The Kubernetes manifests: every overlay rendered and validated strictly, offline.
k8s-check:
	build/k8s-check.sh

# The chaos campaign with real processes (docs/reliability.md); make test runs it shortened.
chaos: services
	cargo build --release --bin herald
	cargo run -p herald --example chaos

chaos-short: services
	cargo build --release --bin herald
	CHAOS_SCALE=0.2 cargo run -p herald --example chaos

# docker-compose up of the real stack, healthchecks, seed, first deliveries, Postman, down -v.
compose-up-test:
	build/compose-up-test.sh

bench: services
	cargo run --release -p herald --example bench -- 20000
	cargo build --release --bin herald
	cargo run --release -p herald --example drain_bench -- 50000 20000
	cargo run --release -p herald --example scale_bench -- 1000000
	cargo run --release -p herald --example receipts_bench -- 20000

# Only the "at scale" section of make bench: a million messages with 1,000 due, then a million
# all due (a campaign), each beside a database holding only the 1,000 due.
bench-scale: services
	cargo build --release --bin herald
	cargo run --release -p herald --example scale_bench -- 1000000
	SCALE_ALL_DUE=1 cargo run --release -p herald --example scale_bench -- 1000000

# A million messages due at once drained by 4 replicas, beside the 50k drain (about 30 minutes).
bench-campaign: services
	cargo build --release --bin herald
	BENCH_ONLY=campaign cargo run --release -p herald --example drain_bench -- 50000

bench-feed: services
	cargo build --release --bin herald
	cargo run --release -p herald --example feed_bench -- 1000 500

openapi:
	cargo run --quiet --bin herald -- openapi --out-dir docs/openapi
