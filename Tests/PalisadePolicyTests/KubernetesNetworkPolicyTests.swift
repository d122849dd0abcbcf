import XCTest
@testable import PalisadePolicy
import PalisadeIdentity

/// Kubernetes NetworkPolicy semantics, table-driven, in the model of the
/// upstream e2e netpol suite: namespaces x, y, z, each with pods a, b, c;
/// every case is a truth table over all pod pairs and ports, checked with
/// the reference evaluator and with the compiled maps looked up as the
/// kernel does.
final class KubernetesNetworkPolicyTests: XCTestCase {
    struct Pod: Hashable, CustomStringConvertible {
        let ns: String, name: String
        var description: String { "\(ns)/\(name)" }
    }
    static let namespaces = ["x", "y", "z"]
    static let pods = namespaces.flatMap { ns in ["a", "b", "c"].map { Pod(ns: ns, name: $0) } }

    static func address(_ p: Pod) -> IPAddress {
        .v4(10, 0, UInt8(namespaces.firstIndex(of: p.ns)!), UInt8(["a", "b", "c"].firstIndex(of: p.name)! + 10))
    }
    static func identity(_ p: Pod) -> NumericIdentity { NumericIdentity(256 + UInt32(pods.firstIndex(of: p)!)) }

    /// As the upstream suite's pods: "serve-80-tcp" and friends name their
    /// ports; here pod c of namespace y serves "serve-80-tcp" on 81 instead,
    /// so a named port resolves to different numbers on different pods.
    static func namedPorts(_ p: Pod) -> [NamedPort] {
        let http: UInt16 = p == Pod(ns: "y", name: "c") ? 81 : 80
        return [NamedPort(name: "serve-80-tcp", port: http), NamedPort(name: "serve-81-tcp", port: 81),
                NamedPort(name: "serve-80-udp", port: 80, proto: .udp)]
    }

    static let universe: Universe = {
        var w: [NumericIdentity: WorkloadIdentity] = [:]
        for p in pods {
            w[identity(p)] = WorkloadIdentity(spiffeID: try! SpiffeID("spiffe://cluster.local/ns/\(p.ns)/sa/\(p.name)"),
                                              labels: ["pod": p.name], namespace: p.ns,
                                              namespaceLabels: ["ns": p.ns, "kubernetes.io/metadata.name": p.ns],
                                              addresses: [address(p)], ports: namedPorts(p))
        }
        return Universe(workloads: w, hostAddresses: [.v4(10, 0, 255, 1)])
    }()

    func k8s(_ name: String, ns: String = "x", _ spec: String) -> String {
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: \(name)\n  namespace: \(ns)\nspec:\n" + spec
    }

    /// Checks reachability for every pod pair, port and protocol against `expected`.
    func check(_ docs: [String], ports: [UInt16] = [80, 81], protos: [UInt8] = [6],
               _ expected: (Pod, Pod, UInt16, UInt8) -> Bool, file: StaticString = #filePath, line: UInt = #line) throws {
        let set = try PolicySet.load(docs.enumerated().map { ("case\($0.offset).yaml", $0.element) })
        let compiled = try PolicyCompiler.compile(set, universe: Self.universe)
        let reference = ReferenceEvaluator(set: set, universe: Self.universe)
        let kernel = CompilerPropertyTests.KernelModel(compiled)
        var wrong: [String] = []
        for s in Self.pods {
            for d in Self.pods where s != d {
                for port in ports {
                    for proto in protos {
                        let eg = Flow(local: Self.identity(s), direction: .egress, peerAddress: Self.address(d), proto: proto, port: port)
                        let ing = Flow(local: Self.identity(d), direction: .ingress, peerAddress: Self.address(s), proto: proto, port: port)
                        let ref = reference.evaluate(eg).verdict != .deny && reference.evaluate(ing).verdict != .deny
                        let ker = kernel.decide(eg) != .deny && kernel.decide(ing) != .deny
                        let want = expected(s, d, port, proto)
                        if ref != want || ker != want { wrong.append("\(s) -> \(d):\(port)/\(proto): want \(want), reference \(ref), kernel \(ker)") }
                    }
                }
            }
        }
        XCTAssertEqual(wrong, [], file: file, line: line)
    }

    func testNoPolicyAllowsEverything() throws {
        try check([]) { _, _, _, _ in true }
    }

    func testDenyAllIngressInNamespace() throws {
        try check([k8s("deny-all", "  podSelector: {}\n  policyTypes: [Ingress]\n")]) { _, d, _, _ in d.ns != "x" }
        // No ingress field and no policyTypes: Ingress is implied.
        try check([k8s("deny-all", "  podSelector: {}\n")]) { _, d, _, _ in d.ns != "x" }
    }

    func testAllowAllIngressWithEmptyRule() throws {
        try check([k8s("allow-all", "  podSelector: {}\n  ingress:\n  - {}\n")]) { _, _, _, _ in true }
    }

    func testAllowFromSameNamespaceOnly() throws {
        try check([k8s("same-ns", "  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n")]) { s, d, _, _ in
            d.ns != "x" || s.ns == "x"
        }
    }

    func testAllowFromOtherNamespaceBySelector() throws {
        try check([k8s("from-y", "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns: y}\n")]) { s, d, _, _ in
            d.ns != "x" || s.ns == "y"
        }
        try check([k8s("from-y-by-name", "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: kubernetes.io/metadata.name, operator: In, values: [y, z]}\n")]) { s, d, _, _ in
            d.ns != "x" || s.ns != "x"
        }
    }

    func testPodAndNamespaceSelectorInOnePeerAreANDed() throws {
        try check([k8s("and", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n")]) { s, d, _, _ in
            d != Pod(ns: "x", name: "a") || s == Pod(ns: "y", name: "b")
        }
    }

    func testSeparatePeersAreORed() throws {
        try check([k8s("or", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n    - podSelector: {matchLabels: {pod: b}}\n")]) { s, d, _, _ in
            d != Pod(ns: "x", name: "a") || s.ns == "y" || s == Pod(ns: "x", name: "b")
        }
    }

    func testPortsAndEndPort() throws {
        try check([k8s("port-80", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - port: 80\n")], ports: [80, 81, 82]) { _, d, port, _ in
            d != Pod(ns: "x", name: "a") || port == 80
        }
        try check([k8s("range", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports:\n    - {port: 80, endPort: 81}\n")], ports: [79, 80, 81, 82]) { _, d, port, _ in
            d != Pod(ns: "x", name: "a") || port == 80 || port == 81
        }
    }

    func testProtocolMatters() throws {
        try check([k8s("udp", "  podSelector: {}\n  ingress:\n  - ports:\n    - {protocol: UDP, port: 53}\n")], ports: [53], protos: [6, 17]) { _, d, _, proto in
            d.ns != "x" || proto == 17
        }
    }

    func testDefaultDenyEgress() throws {
        try check([k8s("deny-egress", "  podSelector: {}\n  policyTypes: [Egress]\n")]) { s, _, _, _ in s.ns != "x" }
    }

    func testEgressToIPBlockWithExcept() throws {
        // x/* may reach 10.0.0.0/23 (namespaces x and y) except y's b pod.
        try check([k8s("ipblock", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/23, except: [10.0.1.11/32]}\n")]) { s, d, _, _ in
            s.ns != "x" || (d.ns != "z" && d != Pod(ns: "y", name: "b"))
        }
    }

    func testPolicyTypesIngressIgnoresEgressSection() throws {
        try check([k8s("ingress-only", "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - {}\n  egress: []\n")]) { _, _, _, _ in true }
    }

    func testPoliciesAreAdditive() throws {
        try check([
            k8s("from-y", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n"),
            k8s("from-z", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: z}}\n"),
        ]) { s, d, _, _ in d != Pod(ns: "x", name: "a") || s.ns != "x" }
    }

    func testPolicyOnlyAppliesInItsNamespace() throws {
        try check([k8s("deny-y", ns: "y", "  podSelector: {matchLabels: {pod: c}}\n")]) { _, d, _, _ in d != Pod(ns: "y", name: "c") }
    }

    /// Ingress: the name resolves on the selected (destination) pod.
    func testNamedPortIngressResolvesOnTheDestination() throws {
        try check([k8s("named-in", ns: "y", "  podSelector: {}\n  ingress:\n  - ports:\n    - port: serve-80-tcp\n")]) { _, d, port, _ in
            d.ns != "y" || port == (d.name == "c" ? 81 : 80)
        }
        // The UDP name does not open TCP.
        try check([k8s("named-udp", "  podSelector: {}\n  ingress:\n  - ports:\n    - {port: serve-80-udp, protocol: UDP}\n")], protos: [6, 17]) { _, d, port, proto in
            d.ns != "x" || (proto == 17 && port == 80)
        }
    }

    /// Egress: the name resolves on the peer pod, whatever the caller's own ports.
    func testNamedPortEgressResolvesOnThePeer() throws {
        try check([k8s("named-out", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {}\n    ports:\n    - port: serve-80-tcp\n")]) { s, d, port, _ in
            s.ns != "x" || port == (d == Pod(ns: "y", name: "c") ? 81 : 80)
        }
        // An unknown name matches nothing.
        try check([k8s("named-none", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: nope\n")]) { s, _, _, _ in s.ns != "x" }
    }

    func testUnsupportedFeaturesAreRejectedClearly() {
        let named = k8s("named", "  podSelector: {}\n  ingress:\n  - ports:\n    - port: Not_A_Name\n")
        XCTAssertThrowsError(try PolicySet.load([("n.yaml", named)])) { XCTAssertTrue("\($0)".contains("n.yaml:10:13: spec.ingress[0].ports[0].port: expected a port number or an IANA service name"), "\($0)") }
        let sctp = k8s("sctp", "  podSelector: {}\n  ingress:\n  - ports:\n    - {protocol: SCTP, port: 80}\n")
        XCTAssertThrowsError(try PolicySet.load([("s.yaml", sctp)])) { XCTAssertTrue("\($0)".contains("SCTP is not supported"), "\($0)") }
    }

    func testConvertRoundTrips() throws {
        let docs = [
            k8s("or", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n    - ipBlock: {cidr: 10.0.0.0/15, except: [10.0.1.11/32]}\n    ports:\n    - {port: 80, endPort: 90}\n    - {protocol: UDP}\n    - {port: serve-80-tcp}\n  policyTypes: [Ingress, Egress]\n"),
        ]
        let original = try PolicySet.load([("k.yaml", docs[0])]).policies
        let text = PolicyWriter.yaml(original)
        let back = try PolicySet.load([("converted.yaml", text)]).policies
        func strip(_ p: Policy) -> Policy {
            var p = p
            p.location = SourceLocation(file: "", line: 0)
            p.ingress = p.ingress?.map { var r = $0; r.location = SourceLocation(file: "", line: 0); return r }
            p.egress = p.egress?.map { var r = $0; r.location = SourceLocation(file: "", line: 0); return r }
            return p
        }
        XCTAssertEqual(back.map(strip), original.map(strip), text)
    }
}
