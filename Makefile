# The two commands a newcomer needs: `make run` and `make test`.
# Everything builds in the one workspace target folder, release profile.

CARGO   ?= cargo
WASM    := wasm32-wasip2
PLUGINS := notification billing analytics orders
GUESTS  := scripted-guest noop-guest wrong-world-guest contract-0-1-0-guest tally-guest trap-guest
SAGA    := inventory payment order-saga
OUT     := target/$(WASM)/release

.PHONY: run install test c-example reliability soak lint fmt console-screenshots plugins examples guests lang-plugins toolchains wasm-target bench bench-broker bench-redis bench-kv bench-hostile bench-languages bench-appliance bench-growth bench-archive bench-delays bench-console fuzz clean image

## run: build the plugins and the appliance, then run it with router.toml
run: plugins
	$(CARGO) build --release -p switchboard
	./target/release/switchboard run --config router.toml

## install: build the switchboard command and install it into cargo's bin folder
## (~/.cargo/bin, on the PATH with rustup): `switchboard new` and the plugin
## scaffolds' `make test` run it from there. CARGO_INSTALL_ROOT=/usr/local make
## install puts it in /usr/local/bin instead
install:
	$(CARGO) install --locked --path host

## test: the whole suite (unit, plugin, sandbox and end-to-end tests), then the
## C guide's example
test: plugins guests lang-plugins examples
	$(CARGO) test --release --workspace
	$(MAKE) c-example

## c-example: build and test examples/c-greeter (docs/c-plugins.md). It needs
## Debian's clang, lld, wasi-libc and libclang-rt-dev-wasm32; without them it is
## an error in CI (CI=true) and a notice elsewhere.
C_PACKAGES := clang lld wasi-libc libclang-rt-dev-wasm32
c-example:
	@if ! printf '#include <stdlib.h>\nint main(void){return 0;}\n' | \
	    clang --target=wasm32-wasi -x c - -o /dev/null >/dev/null 2>&1; then \
	  if [ "$$CI" = true ]; then \
	    echo "error: the C example needs clang for wasm32-wasi: apt-get install $(C_PACKAGES)" >&2; \
	    exit 1; \
	  fi; \
	  echo "note: C example not built: clang cannot target wasm32-wasi here (apt-get install $(C_PACKAGES))" >&2; \
	  exit 0; \
	fi
	$(MAKE) -C examples/c-greeter BINDGEN=tool CARGO_TARGET_DIR=$(CURDIR)/target \
	  SWITCHBOARD=$(CURDIR)/target/release/switchboard test

## reliability: the fault, hostile-input, hostile-plugin and security tests alone
## (also part of `make test`), with each scenario's account printed
RELIABILITY_TESTS := reliability faults hostile_inputs hostile_plugins security
reliability: plugins guests
	$(CARGO) test --release -p switchboard-tests $(addprefix --test ,$(RELIABILITY_TESTS)) -- --test-threads=1 --nocapture

## soak: `reliability` with ten times the load (SOAK=n to choose); figures in RELIABILITY.md
SOAK ?= 10
soak: plugins guests
	SWITCHBOARD_SOAK=$(SOAK) $(CARGO) test --release -p switchboard-tests --test reliability -- --test-threads=1 --nocapture

## lint: formatting and clippy, as CI checks them
lint: wasm-target
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	$(CARGO) clippy --release --target $(WASM) $(addprefix -p ,$(PLUGINS) $(GUESTS) $(SAGA)) -p switchboard-plugin -- -D warnings

fmt:
	$(CARGO) fmt --all

## console-screenshots: the console's pictures in docs/console/ (the README shows
## them), taken in Debian's chromium with the shipped plugins and events flowing
console-screenshots:
	$(CARGO) test --release -p switchboard-tests --test console -- --ignored screenshots_for_the_readme

## plugins: the four seed plugins, as components, copied into plugins/ (watched)
plugins: wasm-target
	$(CARGO) build --release --target $(WASM) $(addprefix -p ,$(PLUGINS))
	@for p in $(PLUGINS); do cmp -s $(OUT)/$$p.wasm plugins/$$p.wasm || cp $(OUT)/$$p.wasm plugins/$$p.wasm; done

## examples: the saga example's three plugins (examples/saga), as components,
## copied into examples/saga/plugins/ (the folder its two configurations watch)
SAGA_OUT := examples/saga/plugins
examples: wasm-target
	$(CARGO) build --release --target $(WASM) $(addprefix -p ,$(SAGA))
	@mkdir -p $(SAGA_OUT)
	@cmp -s $(OUT)/inventory.wasm $(SAGA_OUT)/inventory.wasm || cp $(OUT)/inventory.wasm $(SAGA_OUT)/inventory.wasm
	@cmp -s $(OUT)/payment.wasm $(SAGA_OUT)/payment.wasm || cp $(OUT)/payment.wasm $(SAGA_OUT)/payment.wasm
	@cmp -s $(OUT)/order_saga.wasm $(SAGA_OUT)/order-saga.wasm || cp $(OUT)/order_saga.wasm $(SAGA_OUT)/order-saga.wasm

## lang-plugins: the notification plugin ported to Python and JavaScript, built
## with the pinned toolchains (installed into target/toolchains on first use;
## builds cached there by content hash)
LANG_OUT := target/lang
lang-plugins:
	cd plugins/notification-py && PYTHONDONTWRITEBYTECODE=1 python3 -m unittest --quiet
	node --test plugins/notification-js/
	toolchains/build-plugin python plugins/notification-py/app.py $(LANG_OUT)/notification-py.wasm
	toolchains/build-plugin js plugins/notification-js/notification.js $(LANG_OUT)/notification-js.wasm

## toolchains: install the Python and JavaScript plugin toolchains alone
toolchains:
	toolchains/build-plugin install python
	toolchains/build-plugin install js

## guests: test-only components (hostile, no-op, wrong world)
guests: wasm-target
	$(CARGO) build --release --target $(WASM) $(addprefix -p ,$(GUESTS))

## bench: runtime benchmarks (results go to BENCHMARKS.md)
bench: plugins guests
	$(CARGO) run --release -p switchboard-bench

## bench-broker: Switchboard (the notification plugin) against a hand-written lapin
## consumer with pipelined confirms (the baseline), Node.js amqplib and a
## one-at-a-time lapin consumer, on the local RabbitMQ
## (needs rabbitmqctl and Node.js; ARGS="--events 5000 --rounds 1" for a quick run;
## ARGS="--consumers baseline,switchboard --baseline <older switchboard binary>"
## measures a change before and after in one run)
bench-broker: plugins guests
	$(CARGO) build --release -p switchboard -p switchboard-bench
	./target/release/switchboard-bench broker $(ARGS)

## bench-redis: Switchboard (the notification plugin) on Redis Streams against a
## hand-written redis-rs consumer (XREADGROUP, one MULTI of XADDs and XACK per
## batch), on the shared Redis at 127.0.0.1:6379 (each run under a key prefix of
## its own, removed after; ARGS="--events 5000 --rounds 1" for a quick run)
bench-redis: plugins
	$(CARGO) build --release -p switchboard -p switchboard-bench
	./target/release/switchboard-bench redis $(ARGS)

## bench-kv: one kv call on the embedded store vs Redis (needs Redis at 127.0.0.1:6379)
bench-kv: plugins guests
	$(CARGO) run --release -p switchboard-bench -- kv $(ARGS)

## bench-hostile: a healthy plugin's throughput alone and beside each hostile plugin
bench-hostile: plugins guests
	$(CARGO) run --release -p switchboard-bench -- hostile $(ARGS)

## bench-languages: the notification plugin in Rust, Python and JavaScript, side
## by side (component size, compile, cache load, per-event cost)
bench-languages: plugins lang-plugins
	$(CARGO) run --release -p switchboard-bench -- languages $(ARGS)

## bench-archive: the event archive: append (with and without waiting for the
## fsync), read back, replay through the no-op plugin, and the embedded bus with
## it off and on
bench-archive: guests
	$(CARGO) build --release -p switchboard-bench
	./target/release/switchboard-bench archive $(ARGS)

## bench-appliance: `switchboard run` with the shipped router.toml and plugins,
## loaded through its HTTP ingress: fully handled events/s, then POST → last
## output latency at half that rate (ARGS="--bus embedded,rabbitmq" adds the
## local RabbitMQ; ARGS="--seconds 5" for a quick run)
bench-appliance: plugins
	$(CARGO) build --release -p switchboard -p switchboard-bench
	./target/release/switchboard-bench appliance $(ARGS)

## bench-growth: start-up, throughput and memory of `switchboard run` with 1, 3,
## 10 and 30 copies of the notification plugin
bench-growth: plugins
	$(CARGO) build --release -p switchboard -p switchboard-bench
	./target/release/switchboard-bench growth $(ARGS)

## bench-delays: delayed outputs on the embedded bus: memory with 10,000
## waiting, and a busy plugin's latency while 10,000 fire at once
bench-delays: guests
	$(CARGO) build --release -p switchboard -p switchboard-bench
	./target/release/switchboard-bench delays $(ARGS)

## bench-console: the console's page weight with 30 copies of the notification
## plugin: time to a full overview in Debian's chromium, and the router's
## throughput with no tab, a tab open and the tab's requests alone, side by side
## (needs node and /usr/bin/chromium; ARGS="--seconds 3 --rounds 1" for a quick run)
bench-console: plugins
	$(CARGO) build --release -p switchboard
	@test -d tests/console/node_modules/playwright-core || (cd tests/console && npm ci --no-audit --no-fund)
	node bench/console/page-load.mjs $(ARGS)

## fuzz: each fuzz target in fuzz/ for FUZZ_SECONDS (needs nightly and cargo-fuzz;
## not part of test or CI). Corpora and crashes go to target/fuzz/; one target:
## FUZZ_TARGETS=router_toml. FUZZ_SANITIZER=address for ASan (slower).
FUZZ_SECONDS   ?= 60
FUZZ_TARGETS   ?= topic_match envelope_decode router_toml
FUZZ_SANITIZER ?= none
FUZZ_OUT       := target/fuzz

fuzz:
	@rustup run nightly rustc --version >/dev/null 2>&1 || { \
	  echo "make fuzz needs the nightly toolchain: rustup toolchain install nightly" >&2; exit 1; }
	@cargo +nightly fuzz --version >/dev/null 2>&1 || { \
	  echo "make fuzz needs cargo-fuzz: cargo +nightly install cargo-fuzz --locked" >&2; exit 1; }
	@set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_OUT)/corpus/$$t $(FUZZ_OUT)/artifacts/$$t; \
	  cargo +nightly fuzz run --fuzz-dir fuzz --target-dir $(FUZZ_OUT) -s $(FUZZ_SANITIZER) \
	    $$t $(FUZZ_OUT)/corpus/$$t fuzz/seeds/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -dict=fuzz/dicts/$$t.dict \
	    -artifact_prefix=$(FUZZ_OUT)/artifacts/$$t/; \
	done

## image: the container image from deploy/Dockerfile, tagged $(IMAGE), with podman
## (or docker when podman is absent). The base images it starts from are pulled,
## or made on this machine when no registry answers (deploy/base-images.sh).
## Crates are fetched during the build; see deploy/README.md
IMAGE  ?= switchboard:latest
ENGINE ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
# crun fails on hybrid cgroups; runc works everywhere podman does.
PODMAN_RUNTIME ?= $(shell command -v runc >/dev/null 2>&1 && echo runc)
image:
	ENGINE=$(ENGINE) deploy/base-images.sh
	$(ENGINE) build $(if $(and $(filter podman,$(ENGINE)),$(PODMAN_RUNTIME)),--runtime $(PODMAN_RUNTIME)) \
	  --network host -f deploy/Dockerfile -t $(IMAGE) .

wasm-target:
	@rustup target list --installed | grep -qx $(WASM) || rustup target add $(WASM)

clean:
	$(CARGO) clean
