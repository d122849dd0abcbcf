import Foundation
import XCTest

/// Kernel tests need root, bpffs, network namespaces and cgroup v2. Outside
/// CI they are skipped when those are missing; under CI=true they fail.
func requireKernel() throws {
    let ci = ProcessInfo.processInfo.environment["CI"] == "true"
    var missing: [String] = []
    if getuid() != 0 { missing.append("root") }
    if !FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") && !FileManager.default.isExecutableFile(atPath: "/sbin/ip") { missing.append("iproute2") }
    if !FileManager.default.fileExists(atPath: Paths.palisade) { missing.append("the palisade binary at \(Paths.palisade) (run swift build first)") }
    if missing.isEmpty { return }
    let msg = "kernel test needs: \(missing.joined(separator: ", "))"
    if ci { XCTFail(msg); throw XCTSkip("failed: \(msg)") }
    throw XCTSkip(msg)
}

enum Paths {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    static let products = Bundle.main.bundleURL.path.hasSuffix(".xctest")
        ? Bundle.main.bundleURL.deletingLastPathComponent().path : Bundle.main.bundleURL.path
    static var palisade: String { ProcessInfo.processInfo.environment["PALISADE_BIN"] ?? "\(products)/palisade" }
    static let lab = "\(repo)/tools/lab"
    static let probe = "\(repo)/tools/testing/netprobe.py"
    static let python = FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") ? "/usr/bin/python3" : "python3"
}

@discardableResult
func sh(_ args: [String], input: String? = nil, check: Bool = true) throws -> (status: Int32, output: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    let out = Pipe()
    p.standardOutput = out
    p.standardError = out
    try p.run()
    let data = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    let text = String(decoding: data, as: UTF8.self)
    if check && p.terminationStatus != 0 {
        throw NSError(domain: "sh", code: Int(p.terminationStatus), userInfo: [NSLocalizedDescriptionKey: "\(args.joined(separator: " ")) failed (\(p.terminationStatus)): \(text)"])
    }
    return (p.terminationStatus, text)
}

/// A node namespace with pod namespaces (tools/lab), removed at teardown.
final class Lab {
    let prefix: String
    var node: String { "/run/netns/\(prefix)-node" }
    private var background: [Process] = []
    private var cgroups: [String] = []

    init(_ test: XCTestCase, prefix: String, pods: [String]) throws {
        self.prefix = prefix
        try sh([Paths.lab, "up", prefix] + pods)
        test.addTeardownBlock { [self] in teardown() }
    }

    /// Two nodes joined by a "cloud network" (tools/lab mesh); pods given as
    /// "NODE:NAME", each also a cgroup.
    init(_ test: XCTestCase, prefix: String, meshPods: [String]) throws {
        self.prefix = prefix
        test.addTeardownBlock { [self] in teardown() }
        try sh([Paths.lab, "mesh", prefix] + meshPods)
    }

    /// A mesh lab's node namespace (1 or 2).
    func nodeNetns(_ n: Int) -> String { "/run/netns/\(prefix)-n\(n)" }
    /// A mesh lab pod's cgroup (its processes are the workload).
    func podCgroup(_ pod: String) -> String { "\(cgroup2Mount() ?? "/sys/fs/cgroup")/palisade-lab-\(prefix)/\(pod)" }

    func netns(_ pod: String) -> String { "/run/netns/\(prefix)-\(pod)" }
    func hostInterface(_ pod: String) -> String { "\(prefix)\(pod)" }

    /// Starts a process in a namespace (and optionally a cgroup), stopped at teardown.
    @discardableResult
    func spawn(netns: String, cgroup: String? = nil, _ args: [String], log: String? = nil) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        let command = (["nsenter", "--net=\(netns)"] + args).map { "'\($0)'" }.joined(separator: " ")
        let enter = cgroup.map { "echo $$ > '\($0)/cgroup.procs' && " } ?? ""
        p.arguments = ["-c", "\(enter)exec \(command)"]
        if let log {
            guard FileManager.default.createFile(atPath: log, contents: nil) else { throw CocoaError(.fileWriteUnknown, userInfo: [NSFilePathErrorKey: log]) }
            // One open file for both: two would each write from offset 0
            // over the other's lines.
            let file = FileHandle(forWritingAtPath: log)
            p.standardOutput = file
            p.standardError = file
        } else {
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
        }
        try p.run()
        background.append(p)
        return p
    }

    func serve(_ pod: String, _ proto: String, port: Int, address: String = "::", cgroup: String? = nil, netns: String? = nil) throws {
        try spawn(netns: netns ?? self.netns(pod), cgroup: cgroup, [Paths.python, Paths.probe, "serve", proto, address, "\(port)"])
        // Wait until it listens.
        for _ in 0..<50 {
            let (_, out) = try sh(["nsenter", "--net=\(netns ?? self.netns(pod))", "ss", proto == "tcp" ? "-ltnH" : "-lunH"], check: false)
            if out.contains(":\(port) ") { return }
            usleep(100_000)
        }
        throw NSError(domain: "lab", code: 1, userInfo: [NSLocalizedDescriptionKey: "server on \(pod):\(port) did not start"])
    }

    /// True if a round trip to addr:port from the namespace succeeded.
    func reach(from netns: String, _ proto: String, _ addr: String, _ port: Int, timeout: Double = 1.0, source: String? = nil, cgroup: String? = nil) throws -> Bool {
        var args = [Paths.python, Paths.probe, "connect", proto, addr, "\(port)", "\(timeout)"]
        if let source { args.append(source) }
        let command = (["nsenter", "--net=\(netns)"] + args).map { "'\($0)'" }.joined(separator: " ")
        let enter = cgroup.map { "echo $$ > '\($0)/cgroup.procs' && " } ?? ""
        return try sh(["sh", "-c", "\(enter)exec \(command)"], check: false).status == 0
    }

    func makeCgroup(_ name: String) throws -> String {
        guard let root = cgroup2Mount() else { throw NSError(domain: "lab", code: 2, userInfo: [NSLocalizedDescriptionKey: "no cgroup2 mount"]) }
        let path = "\(root)/palisade-test-\(prefix)/\(name)"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        cgroups.append(path)
        return path
    }

    func teardown() {
        for p in background where p.isRunning { kill(p.processIdentifier, SIGKILL) }
        for p in background { p.waitUntilExit() }
        // Move any straggler out of our cgroups, then remove them (children first).
        for path in cgroups {
            if let procs = try? String(contentsOfFile: "\(path)/cgroup.procs", encoding: .utf8) {
                for pid in procs.split(separator: "\n").compactMap({ Int32($0) }) { kill(pid, SIGKILL) }
            }
            usleep(100_000)
            rmdir(path)
            rmdir((path as NSString).deletingLastPathComponent)
        }
        _ = try? sh([Paths.lab, "down", prefix], check: false)
    }
}

func cgroup2Mount() -> String? {
    guard let text = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) else { return nil }
    for line in text.split(separator: "\n") {
        let f = line.split(separator: " ")
        if f.count > 2 && f[2] == "cgroup2" { return String(f[1]) }
    }
    return nil
}

/// A palisade agent running in the lab's node namespace with its own state
/// directory and bpffs pin root; --cleanup and removal at teardown.
final class AgentHarness {
    let lab: Lab
    let dir: String
    let bpffs: String
    let configPath: String
    /// The node namespace the agent runs in.
    let netns: String
    var process: Process?

    init(_ test: XCTestCase, lab: Lab, extraConfig: String = "", node: Int? = nil) throws {
        self.lab = lab
        let suffix = node.map { "-n\($0)" } ?? ""
        netns = node.map { lab.nodeNetns($0) } ?? lab.node
        dir = NSTemporaryDirectory() + "palisade-test-\(lab.prefix)\(suffix)-\(getpid())"
        bpffs = "/sys/fs/bpf/palisade-test-\(lab.prefix)\(suffix)"
        configPath = "\(dir)/agent.yaml"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: "\(dir)/policies", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: "\(dir)/workloads", withIntermediateDirectories: true)
        try """
        trustDomain: test.local
        stateDir: \(dir)
        bpffs: \(bpffs)
        pollIntervalMilliseconds: 100
        eventsPerSecond: 1000
        \(extraConfig)
        """.write(toFile: configPath, atomically: true, encoding: .utf8)
        test.addTeardownBlock { [self] in
            stop(signal: SIGKILL)
            _ = try? sh(["nsenter", "--net=\(netns)", Paths.palisade, "agent", "--config", configPath, "--cleanup"], check: false)
            _ = try? sh(["rm", "-rf", bpffs], check: false)
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    func start() throws {
        let p = try lab.spawn(netns: netns, [Paths.palisade, "agent", "--config", configPath], log: "\(dir)/agent-\(Date().timeIntervalSince1970).log")
        process = p
    }

    /// Starts this agent after `first` (started here too), with first's CA:
    /// nodes of one trust domain share its (operator-supplied) CA.
    func start(sharingCAOf first: AgentHarness, firstEndpoints: Int, endpoints: Int) throws {
        try first.start()
        try first.waitApplied(endpoints: firstEndpoints)
        try sh(["cp", "-r", "\(first.dir)/ca", "\(dir)/ca"])
        try start()
        try waitApplied(endpoints: endpoints)
    }

    func stop(signal: Int32 = SIGTERM) {
        guard let p = process, p.isRunning else { return }
        kill(p.processIdentifier, signal)
        p.waitUntilExit()
        process = nil
    }

    func palisade(_ args: [String], check: Bool = true) throws -> (status: Int32, output: String) {
        try sh(["nsenter", "--net=\(netns)", Paths.palisade] + args + ["--config", configPath], check: check)
    }

    func writePolicy(_ name: String, _ yaml: String) throws {
        try yaml.write(toFile: "\(dir)/policies/\(name).yaml", atomically: true, encoding: .utf8)
    }

    func enrollPod(_ pod: String, index: Int, labels: [String: String], namespace: String = "default", namespaceLabels: [String: String] = [:],
                   ports: [String] = []) throws {
        var args = ["workload", "enroll", "--name", pod, "--spiffe-id", "spiffe://test.local/ns/\(namespace)/sa/\(pod)",
                    "--namespace", namespace, "--interface", lab.hostInterface(pod),
                    "--address", "10.99.\(index).2", "--address", "fd00:99:\(index)::2"]
        for (k, v) in labels { args += ["--label", "\(k)=\(v)"] }
        for (k, v) in namespaceLabels { args += ["--namespace-label", "\(k)=\(v)"] }
        for p in ports { args += ["--port", p] }
        _ = try palisade(args)
    }

    func enrollCgroup(_ name: String, path: String, labels: [String: String]) throws {
        var args = ["workload", "enroll", "--name", name, "--spiffe-id", "spiffe://test.local/ns/default/sa/\(name)", "--cgroup", path]
        for (k, v) in labels { args += ["--label", "\(k)=\(v)"] }
        _ = try palisade(args)
    }

    struct State: Decodable {
        struct Policy: Decodable { var generation: UInt64; var lastError: String?; var notInstalled: String?; var lockedDown: [String]? }
        struct Endpoint: Decodable { var workload: String }
        var policy: Policy
        var endpoints: [Endpoint]
        var workloadErrors: [String]
    }

    func state() -> State? {
        guard let data = FileManager.default.contents(atPath: "\(dir)/state.json") else { return nil }
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        return try? d.decode(State.self, from: data)
    }

    /// Waits until the agent has applied a generation after `after` with `endpoints` attached.
    @discardableResult
    func waitApplied(after: UInt64 = 0, endpoints: Int, timeout: Double = 15) throws -> State {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let s = state(), s.policy.generation > after, s.endpoints.count == endpoints { return s }
            if let p = process, !p.isRunning { break }
            usleep(100_000)
        }
        let logs = (try? FileManager.default.contentsOfDirectory(atPath: dir))?.filter { $0.hasPrefix("agent-") }
            .compactMap { try? String(contentsOfFile: "\(dir)/\($0)", encoding: .utf8) }.joined(separator: "\n") ?? ""
        throw NSError(domain: "agent", code: 1, userInfo: [NSLocalizedDescriptionKey: "agent did not apply (state: \(String(describing: state()))). Log:\n\(logs)"])
    }

    var generation: UInt64 { state()?.policy.generation ?? 0 }

    /// Warning and error lines of the agent's logs (for failure messages).
    /// The agent's log, last lines first to read (for failure messages).
    func logTail(_ lines: Int = 40) -> String {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir))?.filter { $0.hasPrefix("agent-") }.sorted() ?? [])
            .compactMap { try? String(contentsOfFile: "\(dir)/\($0)", encoding: .utf8) }
            .joined(separator: "\n").split(separator: "\n").suffix(lines).joined(separator: "\n")
    }

    func warnings() -> String {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir))?.filter { $0.hasPrefix("agent-") } ?? [])
            .compactMap { try? String(contentsOfFile: "\(dir)/\($0)", encoding: .utf8) }
            .joined(separator: "\n").split(separator: "\n").filter { $0.contains(" warning ") || $0.contains(" error ") }.joined(separator: "\n")
    }

    struct Event: Decodable { var verdict: String; var reason: String; var direction: String; var source: String; var destination: String
        var destinationPort: UInt16; var proto: String; var local: String; var peer: String }

    func events() -> [Event] {
        guard let text = try? String(contentsOfFile: "\(dir)/events.jsonl", encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { try? JSONDecoder().decode(Event.self, from: Data($0.utf8)) }
    }

    /// Kernel counters from `palisade maps dump counters --output json`.
    func counters() throws -> [String: UInt64] {
        let out = try palisade(["maps", "dump", "counters", "--output", "json"]).output
        let rows = try JSONDecoder().decode([[String: String]].self, from: Data(out.utf8))
        var m: [String: UInt64] = [:]
        for r in rows { m["\(r["direction"]!)/\(r["reason"]!)"] = UInt64(r["packets"]!) ?? 0 }
        return m
    }
}

func policyYAML(_ name: String, _ spec: String) -> String {
    "apiVersion: palisade.dev/v1\nkind: Policy\nmetadata:\n  name: \(name)\nspec:\n" + spec
}

extension XCTestCase {
    /// The common scene: pods a and b enrolled, b admits only a on TCP 8080.
    func setUpPair(_ prefix: String, extraConfig: String = "") throws -> (Lab, AgentHarness) {
        let lab = try Lab(self, prefix: prefix, pods: ["a", "b"])
        let agent = try AgentHarness(self, lab: lab, extraConfig: extraConfig)
        try agent.enrollPod("a", index: 1, labels: ["app": "a"])
        try agent.enrollPod("b", index: 2, labels: ["app": "b"])
        try agent.writePolicy("b", policyYAML("b-ingress", """
          selector: {labels: {app: b}}
          ingress:
            - from: [{labels: {app: a}}]
              ports: [{port: 8080}]
        """))
        return (lab, agent)
    }
}

/// The agent's access log once a line satisfies `done` (lines are written
/// off the proxy's event loop, a moment after the response), or after 5 s.
func accessLog(in dir: String, until done: (Substring) -> Bool) -> String {
    var text = ""
    for _ in 0..<100 {
        text = (try? String(contentsOfFile: "\(dir)/access.jsonl", encoding: .utf8)) ?? ""
        if text.split(separator: "\n").contains(where: done) { break }
        usleep(50_000)
    }
    return text
}
