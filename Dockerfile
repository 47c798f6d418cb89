# flowtel's image: the operator and the four example workflows, on a minimal non-root runtime.
#
#   docker build -t ghcr.io/flowtel/flowtel:0.1.0 .        (compiles with the locked dependencies in RUST_IMAGE)
#
# The base images are build arguments; their defaults are the public images a user's build pulls. Where no registry
# is reachable, `e2e/images build` points them at bases made locally and passes BINARIES=prebuilt, which takes
# binaries already built on the host (from .image-bin/) instead of compiling again.
# The chart's default image is ghcr.io/flowtel/flowtel:<appVersion> (a test holds the names and versions equal).

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
# compiled | prebuilt
ARG BINARIES=compiled

FROM ${RUST_IMAGE} AS compiled
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p flowtel-operator -p flowtel-workflows \
 && mkdir -p /out \
 && cp target/release/flowtel target/release/sync target/release/discovery target/release/enrichment \
       target/release/oset /out/

FROM scratch AS prebuilt
COPY .image-bin/flowtel .image-bin/sync .image-bin/discovery .image-bin/enrichment .image-bin/oset /out/

FROM ${BINARIES} AS binaries

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="flowtel" \
      org.opencontainers.image.description="flowtel operator and example workflows" \
      org.opencontainers.image.source="https://github.com/flowtel/flowtel" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
COPY --from=binaries /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/flowtel"]
CMD ["run"]
