import Foundation
import XCTest

/// The agent's life: killed, restarted, cleaned up, fed bad or changing policy.
final class LifecycleTests: XCTestCase {
    func assertEnforced(_ lab: Lab, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 8080), "allowed flow, \(what)", file: file, line: line)
        XCTAssertFalse(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 9090, timeout: 0.5), "denied flow, \(what)", file: file, line: line)
    }

    func testEnforcementSurvivesKillRestartAndStopsAfterCleanup() throws {
        try requireKernel()
        let (lab, agent) = try setUpPair("pl1")
        try agent.start()
        let first = try agent.waitApplied(endpoints: 2)
        try lab.serve("b", "tcp", port: 8080)
        try lab.serve("b", "tcp", port: 9090)
        try assertEnforced(lab, "with the agent running")
        let status = try agent.palisade(["status"], check: false)
        XCTAssertEqual(status.status, 0, status.output)
        XCTAssertTrue(status.output.contains("veth \(lab.hostInterface("b")) tc ingress prog") && status.output.hasSuffix("healthy\n"), status.output)
        XCTAssertTrue(status.output.contains("certs:      "), status.output)

        // A long-lived allowed connection must live through kill and restart.
        let holdLog = NSTemporaryDirectory() + "pl1-hold-\(getpid()).log"
        let hold = try lab.spawn(netns: lab.netns("a"), [Paths.python, Paths.probe, "hold", "10.99.2.2", "8080", "6", "0.05"], log: holdLog)

        agent.stop(signal: SIGKILL)
        try assertEnforced(lab, "after SIGKILL")

        try agent.start()
        try agent.waitApplied(after: first.policy.generation, endpoints: 2)
        try assertEnforced(lab, "after restart (adopting the pinned state)")

        agent.stop(signal: SIGTERM)
        try assertEnforced(lab, "after SIGTERM")
        hold.waitUntilExit()
        let held = (try? String(contentsOfFile: holdLog, encoding: .utf8)) ?? ""
        XCTAssertEqual(hold.terminationStatus, 0, "the established connection was cut: \(held)")
        XCTAssertTrue(held.contains("failed=0"), held)

        _ = try agent.palisade(["agent", "--cleanup"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: agent.bpffs), "pins remain after --cleanup")
        XCTAssertNotEqual(try agent.palisade(["status"], check: false).status, 0, "status must report a missing datapath")
        XCTAssertTrue(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 9090), "after --cleanup nothing is enforced")
        let filters = try sh(["tc", "-n", "\(lab.prefix)-node", "filter", "show", "dev", lab.hostInterface("b"), "egress"]).output
        XCTAssertFalse(filters.contains("bpf"), filters)
    }

    func testBadPolicyKeepsLastGoodAndIsReported() throws {
        try requireKernel()
        let (lab, agent) = try setUpPair("pl2")
        try agent.start()
        let s = try agent.waitApplied(endpoints: 2)
        try lab.serve("b", "tcp", port: 8080)
        try lab.serve("b", "tcp", port: 9090)

        // A broken file (and a valid one next to it that would open 9090):
        // nothing from the set is applied.
        try agent.writePolicy("broken", policyYAML("broken", """
          selector: {labels: {app: b}}
          ingress:
            - ports: [{port: 99999}]
        """))
        try agent.writePolicy("open", policyYAML("open-9090", """
          selector: {labels: {app: b}}
          ingress:
            - ports: [{port: 9090}]
        """))
        let deadline = Date().addingTimeInterval(10)
        while agent.state()?.policy.lastError == nil && Date() < deadline { usleep(100_000) }
        let status = try agent.palisade(["policy", "status"], check: false)
        XCTAssertNotEqual(status.status, 0)
        XCTAssertTrue(status.output.contains("broken.yaml:8"), status.output)
        XCTAssertTrue(status.output.contains("spec.ingress[0].ports[0].port"), status.output)
        XCTAssertEqual(agent.generation, s.policy.generation, "nothing applied from a failing set")
        try assertEnforced(lab, "with a broken file present")

        let validate = try sh([Paths.palisade, "policy", "validate", "\(agent.dir)/policies/broken.yaml"], check: false)
        XCTAssertEqual(validate.status, 1)
        XCTAssertTrue(validate.output.contains("broken.yaml:8:"), validate.output)
    }

    /// A revoked flow cannot be re-opened from mid-stream by the side that
    /// may still send: after b's ingress from a is revoked, b (whose egress
    /// is open) speaks first on the old connection. Without the tombstone
    /// its packet would start a new entry with b as initiator and a's
    /// packets would pass as replies; with it, both stay dropped.
    func testRevokedFlowCannotBeReopenedByTheOtherSide() throws {
        try requireKernel()
        let (lab, agent) = try setUpPair("pl5")
        try agent.start()
        let gen = try agent.waitApplied(endpoints: 2).policy.generation
        let trigger = NSTemporaryDirectory() + "pl5-trigger-\(getpid())"
        try? FileManager.default.removeItem(atPath: trigger)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: trigger) }
        let server = """
        import os, socket, time
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 8080)); s.listen(1)
        c, _ = s.accept(); c.settimeout(10)
        if c.recv(1) == b"h": c.sendall(b"h")
        while not os.path.exists("\(trigger)"): time.sleep(0.05)
        c.sendall(b"p")
        try:
            d = c.recv(1)
            if d: c.sendall(d)
        except OSError: pass
        time.sleep(5)
        """
        try lab.spawn(netns: lab.netns("b"), [Paths.python, "-c", server])
        let result = NSTemporaryDirectory() + "pl5-result-\(getpid())"
        try? FileManager.default.removeItem(atPath: result)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: result) }
        let client = """
        import socket, sys, time
        def say(s):
            with open("\(result)", "a") as f: f.write(s + "\\n")
        for _ in range(50):
            try: c = socket.create_connection(("10.99.2.2", 8080), timeout=2); break
            except OSError: time.sleep(0.1)
        c.sendall(b"h"); assert c.recv(1) == b"h"; say("established")
        c.settimeout(4)
        try: d = c.recv(1)
        except socket.timeout: say("cut"); sys.exit(0)
        except OSError as e: say("reset %s" % e); sys.exit(0)
        # Data of the revoked flow arrived: try the other direction too.
        try:
            c.sendall(b"q"); c.settimeout(2)
            say("reopened %r %r" % (d, c.recv(1)))
        except OSError as e: say("reopened %r %s" % (d, e))
        """
        let proc = try lab.spawn(netns: lab.netns("a"), [Paths.python, "-c", client])
        for _ in 0..<100 where !((try? String(contentsOfFile: result, encoding: .utf8)) ?? "").contains("established") { usleep(50_000) }
        XCTAssertTrue(((try? String(contentsOfFile: result, encoding: .utf8)) ?? "").contains("established"))
        try agent.writePolicy("b", policyYAML("b-ingress", """
          selector: {labels: {app: b}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 9999}]
        """))
        try agent.waitApplied(after: gen, endpoints: 2)
        XCTAssertTrue(FileManager.default.createFile(atPath: trigger, contents: nil))
        proc.waitUntilExit()
        let out = (try? String(contentsOfFile: result, encoding: .utf8)) ?? ""
        XCTAssertTrue(out.contains("cut") && !out.contains("reopened"), "b's packets crossed the revoked flow: \(out)")
        XCTAssertGreaterThan(try agent.counters()["ingress/denied-revoked", default: 0] + agent.counters()["egress/denied-revoked", default: 0], 0)
    }

    /// Revoking access cuts an established connection (its conntrack entry
    /// is swept), and `policy apply` refuses a bad file without copying it.
    func testRevocationCutsEstablishedConnection() throws {
        try requireKernel()
        let (lab, agent) = try setUpPair("pl4")
        try agent.start()
        let gen = try agent.waitApplied(endpoints: 2).policy.generation
        try lab.serve("b", "tcp", port: 8080)
        let holdLog = NSTemporaryDirectory() + "pl4-hold-\(getpid()).log"
        let hold = try lab.spawn(netns: lab.netns("a"), [Paths.python, Paths.probe, "hold", "10.99.2.2", "8080", "6", "0.05"], log: holdLog)
        usleep(1_000_000)

        let bad = "\(agent.dir)/bad.yaml"
        try policyYAML("b-ingress", "  selector: {labels: {app: b}}\n  ingress:\n    - ports: [{port: 0}]\n").write(toFile: bad, atomically: true, encoding: .utf8)
        let refused = try agent.palisade(["policy", "apply", bad], check: false)
        XCTAssertEqual(refused.status, 1)
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(agent.dir)/policies/bad.yaml"))

        let revoke = "\(agent.dir)/b.yaml"
        try policyYAML("b-ingress", "  selector: {labels: {app: b}}\n  ingress:\n    - from: [{labels: {app: a}}]\n      ports: [{port: 9999}]\n").write(toFile: revoke, atomically: true, encoding: .utf8)
        _ = try agent.palisade(["policy", "apply", revoke])
        try agent.waitApplied(after: gen, endpoints: 2)
        hold.waitUntilExit()
        let held = (try? String(contentsOfFile: holdLog, encoding: .utf8)) ?? ""
        XCTAssertNotEqual(hold.terminationStatus, 0, "the revoked connection kept working: \(held)")
        XCTAssertTrue(held.contains("failed=1"), held)
        XCTAssertFalse(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 8080, timeout: 0.5))
    }

    /// Applies alternate between two rule sets that both allow a->b:8080 and
    /// both deny a->b:9090, while traffic runs: no allowed connection may fail,
    /// no denied one may get through, and the held connection must live.
    func testAtomicApplyUnderLoad() throws {
        try requireKernel()
        let (lab, agent) = try setUpPair("pl3")
        try agent.start()
        var gen = try agent.waitApplied(endpoints: 2).policy.generation
        try lab.serve("b", "tcp", port: 8080)
        try lab.serve("b", "tcp", port: 9090)
        let holdLog = NSTemporaryDirectory() + "pl3-hold-\(getpid()).log"
        let hold = try lab.spawn(netns: lab.netns("a"), [Paths.python, Paths.probe, "hold", "10.99.2.2", "8080", "8", "0.02"], log: holdLog)

        let variants = [
            policyYAML("b-ingress", "  selector: {labels: {app: b}}\n  ingress:\n    - from: [{labels: {app: a}}]\n      ports: [{port: 8080}, {port: 8443}]\n"),
            policyYAML("b-ingress", "  selector: {labels: {app: b}}\n  ingress:\n    - from: [{cidr: 10.99.1.0/24}]\n      ports: [{port: 8000-8100}]\n    - action: deny\n      ports: [{port: 9000-9999}]\n"),
        ]
        var failures: [String] = []
        for i in 0..<12 {
            try agent.writePolicy("b", variants[i % 2])
            // Probe while the apply is happening.
            for _ in 0..<3 {
                if !(try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 8080)) { failures.append("apply \(i): allowed connection failed") }
                if try lab.reach(from: lab.netns("a"), "tcp", "10.99.2.2", 9090, timeout: 0.2) { failures.append("apply \(i): denied connection succeeded") }
            }
            gen = try agent.waitApplied(after: gen, endpoints: 2).policy.generation
        }
        XCTAssertEqual(failures, [])
        hold.waitUntilExit()
        let held = (try? String(contentsOfFile: holdLog, encoding: .utf8)) ?? ""
        XCTAssertTrue(held.contains("failed=0"), "held connection: \(held)")
    }
}
