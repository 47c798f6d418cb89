# flowtel's image: the operator and the four example workflows, built with the locked dependencies, on a minimal
# non-root runtime. Build (what CI would run; there is no container engine on the development machine):
#   docker build -t ghcr.io/flowtel/flowtel:0.1.0 .
# The chart's default image is ghcr.io/flowtel/flowtel:<appVersion> (a test holds the names and versions equal).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p flowtel-operator -p flowtel-workflows \
 && mkdir -p /out \
 && cp target/release/flowtel target/release/sync target/release/discovery target/release/enrichment \
       target/release/oset /out/

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="flowtel" \
      org.opencontainers.image.description="flowtel operator and example workflows" \
      org.opencontainers.image.source="https://github.com/flowtel/flowtel" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/flowtel"]
CMD ["run"]
