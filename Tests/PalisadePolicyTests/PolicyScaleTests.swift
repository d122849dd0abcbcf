import XCTest
import PalisadeTestSupport
@testable import PalisadePolicy
import PalisadeIdentity

/// Entries grow with the selectors in force, not with the identities of the
/// cluster, and only this node's workloads get any.
final class PolicyScaleTests: XCTestCase {
    /// A cluster of `identities` identities over `namespaces` namespaces, of
    /// which `locals` (spread over the namespaces) run on this node.
    static func cluster(identities: Int, locals: Int, namespaces: Int) -> Universe {
        var w: [NumericIdentity: WorkloadIdentity] = [:]
        for i in 0..<identities {
            let ns = "ns\(i % namespaces)"
            w[NumericIdentity(256 + UInt32(i))] = WorkloadIdentity(
                spiffeID: try! SpiffeID("spiffe://cluster.local/ns/\(ns)/sa/w\(i)"),
                labels: ["app": "app\(i % 50)", "tier": i % 3 == 0 ? "db" : "web"], namespace: ns,
                addresses: [.v4(10, UInt8(i >> 16), UInt8((i >> 8) & 0xff), UInt8(i & 0xff))],
                isLocal: i < locals, ports: [NamedPort(name: "http", port: i % 2 == 0 ? 8080 : 8081)])
        }
        return Universe(workloads: w, hostAddresses: [])
    }

    /// Kubernetes' usual "allow from my namespace" in every namespace, plus
    /// label rules and a named port.
    static func policies(namespaces: Int) throws -> PolicySet {
        var docs: [(String, String)] = []
        for n in 0..<namespaces {
            docs.append(("ns\(n).yaml", """
            apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {name: same-namespace, namespace: ns\(n)}
            spec:
              podSelector: {}
              ingress:
              - from: [{podSelector: {}}]
            """))
        }
        docs.append(("labels.yaml", """
        apiVersion: palisade.dev/v1
        kind: Policy
        metadata: {name: db}
        spec:
          selector: {labels: {tier: db}}
          ingress:
            - from: [{labels: {app: app7}}]
              ports: [{port: 5432}]
            - action: deny
              from: [{labels: {app: app13}}]
          egress:
            - to: [{labels: {tier: web}}]
              ports: [{port: http}]
        """))
        return try PolicySet.load(docs)
    }

    func testNamespaceWideAllowGrowsWithSelectorsNotIdentities() throws {
        let namespaces = 10
        let set = try Self.policies(namespaces: namespaces)
        var sizes: [Int: Int] = [:]
        for identities in [1_000, 20_000] {
            let universe = Self.cluster(identities: identities, locals: 200, namespaces: namespaces)
            let start = Date()
            let compiled = try PolicyCompiler.compile(set, universe: universe)
            let ms = Int(Date().timeIntervalSince(start) * 1000)
            let pairwise = PolicyCompiler.pairwiseEntryCount(set, universe: universe)
            print("\(identities) identities, 200 local: \(compiled.entries.count) policy entries, \(compiled.peerClasses.count) classed identities, "
                  + "\(compiled.classSelectors.count) classes, \(compiled.defaults.count) defaults (pairwise: \(pairwise)) in \(ms) ms")
            sizes[identities] = compiled.entries.count
            if identities >= 10_000 { XCTAssertLessThan(compiled.totalEntries, 2 * identities) }
            XCTAssertLessThan(compiled.entries.count, 10 * 200, "policy entries per local workload stay a handful")
            // Only local workloads are keys.
            XCTAssertTrue(compiled.entries.allSatisfy { universe.workloads[$0.local]!.isLocal })
            XCTAssertTrue(compiled.defaults.allSatisfy { universe.workloads[$0.local]!.isLocal })

            // The classes decide as the reference does, on a sample of flows.
            let reference = ReferenceEvaluator(set: set, universe: universe)
            let lookup = CompiledLookup(compiled)
            var r = SplitMix64(seed: UInt64(identities))
            var allowed = 0, denied = 0
            for _ in 0..<2_000 {
                let local = NumericIdentity(256 + UInt32(Int.random(in: 0..<200, using: &r)))
                let peer = NumericIdentity(256 + UInt32(Int.random(in: 0..<identities, using: &r)))
                let f = Flow(local: local, direction: Bool.random(using: &r) ? .ingress : .egress,
                             peerAddress: universe.workloads[peer]!.addresses[0], proto: 6,
                             port: [5432, 8080, 8081, 9000].randomElement(using: &r)!)
                let want = reference.evaluate(f).verdict
                XCTAssertEqual(lookup.evaluate(f).verdict, want, "\(f)")
                XCTAssertEqual(lookup.evaluate(local: f.local, direction: f.direction, peer: peer, cidrPeer: nil, proto: 6, port: f.port).verdict,
                               want, "tunnelled \(f)")
                if want == .allow { allowed += 1 } else if want == .deny { denied += 1 }
            }
            XCTAssertGreaterThan(allowed, 100)
            XCTAssertGreaterThan(denied, 100)
        }
        // Twenty times the identities, the same policy entries.
        XCTAssertEqual(sizes[1_000], sizes[20_000])
    }

    /// A policy that cannot be installed locks the workloads it selects
    /// down, where the policy in force leaves them open.
    func testLockDownCoversWhatThePolicyInForceLeavesOpen() throws {
        let universe = Self.cluster(identities: 60, locals: 6, namespaces: 2)
        let inForce = try PolicySet.load([("old.yaml", """
        apiVersion: palisade.dev/v1
        kind: Policy
        metadata: {name: old}
        spec:
          selector: {namespace: ns0}
          ingress: [{from: [{namespace: ns0}]}]
        """)])
        let refused = try Self.policies(namespaces: 2)
        var fallback = try PolicyCompiler.compile(inForce, universe: universe)
        let before = fallback.defaults.count
        let locked = PolicyCompiler.lockDown(&fallback, selectedBy: refused, universe: universe)
        // ns0's locals keep the old ingress policy; everything else selected is locked.
        XCTAssertEqual(before, 3)   // locals 0, 2, 4 in ns0, ingress
        XCTAssertEqual(Set(locked.map(\.rawValue)), [256, 257, 259, 261])   // ns1's locals, and local 0 (tier db) for egress
        let lookup = CompiledLookup(fallback)
        let egress = lookup.evaluate(local: NumericIdentity(256), direction: .egress, peer: NumericIdentity(300), cidrPeer: nil, proto: 6, port: 8080)
        XCTAssertEqual(egress.verdict, .deny)
        XCTAssertEqual(fallback.rule(egress.ruleID)?.kind, .lockdown)
        let kept = lookup.evaluate(local: NumericIdentity(258), direction: .ingress, peer: NumericIdentity(260), cidrPeer: nil, proto: 6, port: 1)
        XCTAssertEqual(kept.verdict, .allow, "the policy in force stays for the workloads it covers")
        XCTAssertTrue(fallback.ipcache.count >= 60, "the ipcache covers every workload, refused or not")
    }
}
