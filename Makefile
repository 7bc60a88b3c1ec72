# The two commands a newcomer needs:
#   make run    the whole local stack (MongoDB, Redis, sink, API, scheduler, 10 mock messages)
#   make test   the whole test suite (format, lints, every test against real servers, ...)
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: run test services services-down fmt-check lint unit-tests openapi

run:
	build/run-local.sh

test: services fmt-check lint unit-tests

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

openapi:
	cargo run --quiet --bin herald -- openapi --out-dir docs/openapi
