// swift-tools-version:6.0
import Foundation
import PackageDescription

let package = Package(
    name: "palisade",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "palisade", targets: ["palisade"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.0.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.0.0"),
        .package(url: "https://github.com/apple/swift-certificates", from: "1.0.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.1.0"),
        .package(url: "https://github.com/vapor/jwt-kit", from: "5.0.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.30.0"),
        .package(url: "https://github.com/apple/swift-nio-http2", from: "1.30.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.20.0"),
    ],
    targets: [
        // libbpf from the system (Debian's libbpf-dev).
        .systemLibrary(name: "CLibbpf", pkgConfig: "libbpf", providers: [.apt(["libbpf-dev"])]),
        // The structs shared with the kernel: bpf/include/palisade_shared.h, imported, not copied.
        .target(name: "CPalisadeShared"),
        // LIBBPF_OPTS, setns and friends that Swift cannot spell.
        .target(name: "CShim", dependencies: ["CLibbpf"]),
        // glibc's DNS message parser (libresolv), with the accessors that are C macros.
        .target(name: "CResolv", linkerSettings: [.linkedLibrary("resolv")]),
        // The DNS proxy for toFQDNs rules: enrolled workloads' DNS, forwarded
        // to the resolver they asked, answers released once their addresses
        // are in the kernel; the learned-name cache with its TTLs.
        .target(name: "PalisadeDNS", dependencies: [
            "CResolv", "PalisadePolicy", "PalisadeIdentity", "PalisadeRelay",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        // Swift API over libbpf: objects, programs, typed maps, tc, cgroups, ring buffers, pins.
        .target(name: "PalisadeBPF", dependencies: ["CLibbpf", "CShim"]),
        // SPIFFE IDs and numeric security identities.
        .target(name: "PalisadeIdentity", dependencies: ["CPalisadeShared"]),
        // Policy model, YAML parser, compiler to map entries, reference evaluator. Pure.
        .target(name: "PalisadePolicy", dependencies: [
            "PalisadeIdentity", "CPalisadeShared", .product(name: "Yams", package: "Yams"),
        ]),
        // Owns the kernel maps and programs; ships the compiled eBPF objects.
        .target(
            name: "PalisadeDatapath",
            dependencies: ["PalisadeBPF", "PalisadeIdentity", "PalisadePolicy", "CPalisadeShared"],
            plugins: ["BPFCompiler"]
        ),
        // The trust domain's CA: X.509-SVID issuance and SPIFFE-aware verification.
        .target(name: "PalisadeCA", dependencies: [
            "PalisadeIdentity",
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // Tokens at the edge: a JWT from a configured issuer (JWKS file) mapped to an identity.
        .target(name: "PalisadeJWT", dependencies: [.product(name: "JWTKit", package: "jwt-kit")]),
        // Byte relays between two channels and marked connections to workloads
        // (shared by the tunnel and the L7 proxy).
        .target(name: "PalisadeRelay", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        // The L7 proxy: HTTP/1.1 and HTTP/2 requests judged one by one (gate,
        // frame relay, upgrades), the HTTP/2 caller guard, the access log entry.
        .target(name: "PalisadeL7", dependencies: [
            "PalisadeRelay", "PalisadeIdentity",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOHTTP2", package: "swift-nio-http2"),
            .product(name: "NIOHPACK", package: "swift-nio-http2"),
        ]),
        // Agent-to-agent mTLS (TLS 1.3 only, SPIFFE verification in the handshake),
        // HBONE-style HTTP/2 CONNECT streams over it, the pool, the outbound listener.
        .target(name: "PalisadeTunnel", dependencies: [
            "PalisadeCA", "PalisadeIdentity", "PalisadeRelay", "PalisadeL7",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOHTTP2", package: "swift-nio-http2"),
            .product(name: "NIOHPACK", package: "swift-nio-http2"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "X509", package: "swift-certificates"),
        ]),
        // The trust domain's issuer (`palisade ca serve`): join tokens,
        // registrations, CSR signing over HTTPS; and the node's client of it.
        .target(name: "PalisadeIssuer", dependencies: [
            "PalisadeCA", "PalisadeIdentity", "PalisadePolicy", "PalisadeTunnel", "PalisadeStore",
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // Shared state: the Store interface, the embedded file store and etcd v3
        // (its JSON gateway over AsyncHTTPClient), cluster-wide identity allocation.
        .target(name: "PalisadeStore", dependencies: [
            "PalisadeIdentity",
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ]),
        // Prometheus exposition of kernel counters, map pressure and agent events (NIO HTTP).
        .target(name: "PalisadeMetrics", dependencies: [
            "PalisadeDatapath", "PalisadePolicy", "CPalisadeShared",
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ]),
        // Configuration, workload enrollment, state directory, reconcile loop.
        .target(name: "PalisadeAgent", dependencies: [
            "PalisadeDatapath", "PalisadePolicy", "PalisadeMetrics", "PalisadeCA", "PalisadeTunnel", "PalisadeL7", "PalisadeJWT", "PalisadeStore", "PalisadeIssuer", "PalisadeDNS",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Yams", package: "Yams"),
        ]),
        .executableTarget(name: "palisade", dependencies: [
            "PalisadeAgent", "PalisadeBPF", "PalisadeDatapath", "CPalisadeShared", "PalisadeCA", "PalisadeStore", "PalisadeIssuer", "PalisadeMetrics", "PalisadeL7",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .plugin(name: "BPFCompiler", capability: .buildTool()),
        // Sockets and ports shared by the test targets.
        .target(name: "PalisadeTestSupport", path: "Tests/PalisadeTestSupport"),
        .testTarget(name: "PalisadePolicyTests", dependencies: ["PalisadePolicy", "PalisadeTestSupport"]),
        .testTarget(name: "PalisadeMetricsTests", dependencies: ["PalisadeMetrics", "PalisadeTestSupport",
            .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOConcurrencyHelpers", package: "swift-nio")]),
        .testTarget(name: "PalisadeAgentTests", dependencies: ["PalisadeAgent", "PalisadeTunnel", "PalisadeL7", "PalisadeTestSupport", "CPalisadeShared",
            "PalisadePolicy", "PalisadeIdentity",
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio")]),
        .testTarget(name: "PalisadeTunnelTests", dependencies: ["PalisadeTunnel", "PalisadeL7", "PalisadeRelay", "PalisadeCA", "PalisadeTestSupport", "PalisadeIdentity", "PalisadeAgent", "PalisadeJWT",
            "PalisadePolicy", .product(name: "JWTKit", package: "jwt-kit"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"), .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"), .product(name: "NIOHPACK", package: "swift-nio-http2"),
            .product(name: "NIOEmbedded", package: "swift-nio"),
            .product(name: "X509", package: "swift-certificates"), .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "PalisadeJWTTests", dependencies: ["PalisadeJWT", .product(name: "JWTKit", package: "jwt-kit")]),
        .testTarget(name: "PalisadeCATests", dependencies: ["PalisadeCA", "PalisadeIssuer", "PalisadeIdentity", "PalisadeStore",
            .product(name: "X509", package: "swift-certificates"), .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "PalisadeStoreTests", dependencies: ["PalisadeStore", "PalisadeIdentity", "PalisadeTestSupport"]),
        .testTarget(name: "PalisadeKernelTests", dependencies: ["PalisadeAgent", "PalisadeDatapath"]),
        .testTarget(name: "PalisadeDNSTests", dependencies: ["PalisadeDNS", "PalisadePolicy"]),
    ],
    swiftLanguageModes: [.v6]
)

// The libFuzzer target exists only for tools/fuzz/run (it has no main).
if ProcessInfo.processInfo.environment["PALISADE_FUZZ"] == "1" {
    package.targets.append(.executableTarget(name: "PalisadeFuzz", dependencies: [
        "PalisadePolicy", "PalisadeIdentity", "PalisadeCA", "PalisadeStore", "PalisadeAgent", "PalisadeTunnel", "PalisadeL7", "PalisadeDNS",
        .product(name: "X509", package: "swift-certificates"),
        .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOEmbedded", package: "swift-nio"),
        .product(name: "NIOHTTP1", package: "swift-nio"),
        .product(name: "NIOHTTP2", package: "swift-nio-http2"), .product(name: "NIOHPACK", package: "swift-nio-http2"),
    ]))
}
