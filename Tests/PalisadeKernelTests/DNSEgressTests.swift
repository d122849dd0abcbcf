import Foundation
import XCTest

/// toFQDNs through the agent's DNS proxy, with a real DNS server (dnsmasq)
/// and servers in a namespace standing for the internet.
final class DNSEgressTests: XCTestCase {
    /// The internet: dnsmasq on 10.99.1.2 (and fd00:99:1::2) answering for
    /// names, aliases and short TTLs; echo servers on port 8080 at every
    /// address those names give (203.0.113.0/24, 2001:db8::/64).
    struct Internet {
        let lab: Lab
        let resolver = "10.99.1.2"
        var ns: String { lab.netns("inet") }

        init(_ test: XCTestCase, prefix: String) throws {
            lab = try Lab(test, prefix: prefix, pods: ["inet"])
            let node = lab.node, inet = lab.netns("inet")
            for last in [10, 11, 20, 21, 30, 40, 50, 60] {
                try sh(["nsenter", "--net=\(inet)", "ip", "addr", "add", "203.0.113.\(last)/32", "dev", "lo"])
            }
            try sh(["nsenter", "--net=\(inet)", "ip", "addr", "add", "2001:db8::10/128", "dev", "lo"])
            try sh(["nsenter", "--net=\(node)", "ip", "route", "add", "203.0.113.0/24", "via", "10.99.1.2"])
            try sh(["nsenter", "--net=\(node)", "ip", "-6", "route", "add", "2001:db8::/64", "via", "fd00:99:1::2"])
            try lab.serve("inet", "tcp", port: 8080)
            // Daemonized, not a child of the test: `tools/lab down` ends it
            // with the namespace (a foreground child here held up the
            // reaping of every later child process).
            let args = ["dnsmasq", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--pid-file=\(NSTemporaryDirectory())dnsmasq-\(prefix).pid",
                        "--user=root", "--bind-interfaces", "--listen-address=10.99.1.2,fd00:99:1::2", "--port=53",
                        "--host-record=api.example.com,203.0.113.10,2001:db8::10,300",
                        "--host-record=other.example.com,203.0.113.40,300",
                        "--host-record=a.cdn.test,203.0.113.20,300",
                        "--host-record=b.x.cdn.test,203.0.113.21,300",
                        "--host-record=edge.provider.net,203.0.113.30,300",
                        "--cname=www.shop.test,edge.provider.net,300",
                        "--host-record=short.example.com,203.0.113.50,1",
                        "--host-record=reused.example.com,203.0.113.10,300",
                        "--host-record=later.example.com,203.0.113.60,300",
                        "--host-record=evil.org,203.0.113.11,300"]
            try sh(["sh", "-c", (["nsenter", "--net=\(inet)"] + args).map { "'\($0)'" }.joined(separator: " ") + " >/dev/null 2>&1"])
            for _ in 0..<50 {
                if try sh(["nsenter", "--net=\(inet)", "ss", "-lunH"], check: false).output.contains("10.99.1.2:53 ") { return }
                usleep(100_000)
            }
            throw NSError(domain: "dns", code: 1, userInfo: [NSLocalizedDescriptionKey: "dnsmasq did not start"])
        }
    }

    /// Runs dig in the workload (its cgroup, the node's network).
    func dig(_ lab: Lab, cgroup: String, _ args: [String]) throws -> (status: Int32, output: String) {
        let command = (["nsenter", "--net=\(lab.node)", "dig", "+time=2", "+tries=1"] + args).map { "'\($0)'" }.joined(separator: " ")
        return try sh(["sh", "-c", "echo $$ > '\(cgroup)/cgroup.procs' && exec \(command)"], check: false)
    }

    func testNamesTheWorkloadLooksUpAreAllowedAndNothingElse() throws {
        try requireKernel()
        let net = try Internet(self, prefix: "pdns1")
        let lab = net.lab
        let agent = try AgentHarness(self, lab: lab, extraConfig: "fqdn: {minTTL: 1, graceSeconds: 2}")
        let web = try lab.makeCgroup("web")
        try agent.enrollCgroup("web", path: web, labels: ["app": "web"])
        try agent.writePolicy("web", policyYAML("web-egress", """
          selector: {labels: {app: web}}
          egress:
            - to: [{cidr: 10.99.1.2/32}, {cidr: "fd00:99:1::2/128"}]
              ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
              dns: [{matchPattern: "*.example.com"}, {matchPattern: "*.test"}]
            - toFQDNs: [{matchName: api.example.com}, {matchPattern: "*.cdn.test"}, {matchName: www.shop.test}, {matchName: short.example.com}]
              ports: [{port: 8080}]
        """))
        try agent.start()
        try agent.waitApplied(endpoints: 1)
        func reach(_ addr: String, timeout: Double = 1) throws -> Bool { try lab.reach(from: lab.node, "tcp", addr, 8080, timeout: timeout, cgroup: web) }
        func lookup(_ name: String, _ extra: [String] = []) throws -> String {
            let r = try dig(lab, cgroup: web, ["@\(net.resolver)", name, "+short"] + extra)
            XCTAssertEqual(r.status, 0, "dig \(name): \(r.output)\n\(agent.logTail())")
            return r.output.trimmingCharacters(in: .whitespacesAndNewlines)
        }

        // Nothing is known before a lookup.
        XCTAssertFalse(try reach("203.0.113.10"), "an address no lookup gave is refused")

        // An allowed name: its first connect after the lookup succeeds.
        XCTAssertEqual(try lookup("api.example.com"), "203.0.113.10")
        XCTAssertTrue(try reach("203.0.113.10"), "the first connect after the lookup\n\(agent.logTail())")
        // AAAA.
        XCTAssertEqual(try lookup("api.example.com", ["AAAA"]), "2001:db8::10")
        XCTAssertTrue(try reach("2001:db8::10"), "IPv6 address of an allowed name")

        // A name the DNS rules allow but no toFQDNs rule names: resolved, refused.
        XCTAssertEqual(try lookup("other.example.com"), "203.0.113.40")
        XCTAssertFalse(try reach("203.0.113.40"), "address of a name no rule allows")
        // A name the DNS rules do not allow: REFUSED, and a flow event.
        let refused = try dig(lab, cgroup: web, ["@\(net.resolver)", "evil.org"])
        XCTAssertTrue(refused.output.contains("status: REFUSED"), refused.output)
        XCTAssertFalse(try reach("203.0.113.11"))

        // Wildcard: one label and several.
        XCTAssertEqual(try lookup("a.cdn.test"), "203.0.113.20")
        XCTAssertEqual(try lookup("b.x.cdn.test"), "203.0.113.21")
        XCTAssertTrue(try reach("203.0.113.20"))
        XCTAssertTrue(try reach("203.0.113.21"))

        // A CNAME chain: the policy names the alias; the address is the target's.
        XCTAssertTrue(try lookup("www.shop.test").contains("203.0.113.30"))
        XCTAssertTrue(try reach("203.0.113.30"), "address at the end of a CNAME chain\n\(agent.logTail())")

        // The resolver over IPv6.
        let v6 = try dig(lab, cgroup: web, ["@fd00:99:1::2", "b.x.cdn.test", "+short"])
        XCTAssertEqual(v6.output.trimmingCharacters(in: .whitespacesAndNewlines), "203.0.113.21", "DNS to an IPv6 resolver: \(v6.output)")

        // DNS over TCP.
        XCTAssertEqual(try lookup("later.example.com", ["+tcp"]), "203.0.113.60")
        XCTAssertFalse(try reach("203.0.113.60"), "later.example.com is not in the toFQDNs rules")
        XCTAssertEqual(try lookup("a.cdn.test", ["+tcp"]), "203.0.113.20")

        // An address reused by an unrelated name keeps what it had.
        XCTAssertEqual(try lookup("reused.example.com"), "203.0.113.10")
        XCTAssertTrue(try reach("203.0.113.10"), "an unrelated name sharing the address takes nothing away")

        // TTL: a held connection outlives expiry; a new one after expiry + grace is refused.
        XCTAssertEqual(try lookup("short.example.com"), "203.0.113.50")
        XCTAssertTrue(try reach("203.0.113.50"))
        let holdOut = "\(agent.dir)/hold.out"
        let hold = try lab.spawn(netns: lab.node, cgroup: web, [Paths.python, Paths.probe, "hold", "203.0.113.50", "8080", "7", "0.5"], log: holdOut)
        usleep(6_000_000)   // TTL 1 s + grace 2 s, and the agent's once-a-second expiry
        XCTAssertFalse(try reach("203.0.113.50"), "a new connect after expiry and grace\n\(agent.logTail())")
        hold.waitUntilExit()
        let held = (try? String(contentsOfFile: holdOut, encoding: .utf8)) ?? ""
        XCTAssertTrue(held.contains("failed=0"), "the held connection kept working past expiry: \(held)")

        // Explain by name: the addresses DNS gave, judged as the kernel judges them.
        let explained = try agent.palisade(["policy", "explain", "--from", "web", "--to", "api.example.com", "--port", "8080"]).output
        XCTAssertTrue(explained.hasPrefix("ALLOWED") && explained.contains("203.0.113.10") && explained.contains("matchName: api.example.com"), explained)
        let notYet = try agent.palisade(["policy", "explain", "--from", "web", "--to", "z.cdn.test", "--port", "8080"], check: false).output
        XCTAssertTrue(notYet.contains("no address learned for z.cdn.test") && notYet.contains("matchPattern: *.cdn.test"), notYet)

        // What the agent learned, and what it saw.
        let dump = try agent.palisade(["maps", "dump", "fqdn"]).output
        XCTAssertTrue(dump.contains("api.example.com") && dump.contains("203.0.113.10"), dump)
        XCTAssertFalse(dump.contains("short.example.com"), "expired names leave the dump: \(dump)")
        let flows = (try? String(contentsOfFile: "\(agent.dir)/events.jsonl", encoding: .utf8)) ?? ""
        XCTAssertTrue(flows.contains("\"dnsName\":\"evil.org\"") && flows.contains("dns-refused"), flows)
        XCTAssertTrue(flows.contains("\"dnsName\":\"api.example.com\""), flows)
        XCTAssertTrue(flows.split(separator: "\n").contains { $0.contains("\"dnsName\":\"b.x.cdn.test\"") && $0.contains("\"destination\":\"fd00:99:1::2\"") },
                      "the IPv6 lookup went through the proxy: \(flows)")
        let metrics = try sh(["nsenter", "--net=\(lab.node)", "curl", "-s", "http://127.0.0.1:9654/metrics"]).output
        XCTAssertTrue(metrics.contains("palisade_dns_requests_total{result=\"answered\"}"), metrics)
        XCTAssertTrue(metrics.contains("palisade_dns_requests_total{result=\"refused\"}"), metrics)
        XCTAssertTrue(metrics.contains("palisade_fqdn_learned_addresses"), metrics)
    }

    /// With the agent killed, DNS still answers (the kernel lets it go to the
    /// resolver) and what was learned stays enforced; back, it learns again.
    func testDNSAndLearnedAddressesSurviveTheAgent() throws {
        try requireKernel()
        let net = try Internet(self, prefix: "pdns2")
        let lab = net.lab
        let agent = try AgentHarness(self, lab: lab)
        let web = try lab.makeCgroup("web")
        try agent.enrollCgroup("web", path: web, labels: ["app": "web"])
        try agent.writePolicy("web", policyYAML("web-egress", """
          selector: {labels: {app: web}}
          egress:
            - to: [{cidr: 10.99.1.2/32}]
              ports: [{port: 53, protocol: UDP}]
            - toFQDNs: [{matchPattern: "*.example.com"}]
              ports: [{port: 8080}]
        """))
        try agent.start()
        try agent.waitApplied(endpoints: 1)
        func reach(_ addr: String) throws -> Bool { try lab.reach(from: lab.node, "tcp", addr, 8080, timeout: 1, cgroup: web) }
        XCTAssertEqual(try dig(lab, cgroup: web, ["@\(net.resolver)", "api.example.com", "+short"]).output.trimmingCharacters(in: .whitespacesAndNewlines), "203.0.113.10")
        XCTAssertTrue(try reach("203.0.113.10"))

        let before = agent.generation
        agent.stop(signal: SIGKILL)
        let direct = try dig(lab, cgroup: web, ["@\(net.resolver)", "later.example.com", "+short"])
        XCTAssertEqual(direct.output.trimmingCharacters(in: .whitespacesAndNewlines), "203.0.113.60", "DNS with the agent down: \(direct.output)")
        XCTAssertTrue(try reach("203.0.113.10"), "learned before: still allowed with the agent down")
        XCTAssertFalse(try reach("203.0.113.60"), "resolved while the agent was down: nobody learned it, refused")
        XCTAssertFalse(try reach("203.0.113.40"), "never resolved: refused")

        try agent.start()
        try agent.waitApplied(after: before, endpoints: 1)
        XCTAssertTrue(try reach("203.0.113.10"), "the restarted agent kept what it had learned\n\(agent.logTail())")
        XCTAssertEqual(try dig(lab, cgroup: web, ["@\(net.resolver)", "later.example.com", "+short"]).output.trimmingCharacters(in: .whitespacesAndNewlines), "203.0.113.60")
        XCTAssertTrue(try reach("203.0.113.60"), "learned again once the agent is back\n\(agent.logTail())")
    }
}
