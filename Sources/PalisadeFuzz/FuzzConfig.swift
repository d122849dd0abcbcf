import PalisadeAgent
import PalisadePolicy

/// Target "config": the agent's configuration, workload files and HTTP
/// rule files, all from one YAML text (each parser takes what it can).
func fuzzConfig(_ bytes: UnsafeBufferPointer<UInt8>) {
    let text = String(decoding: bytes, as: UTF8.self)
    _ = try? AgentConfig.parse(text, file: "agent.yaml")
    if let ws = try? Workload.parse(text, file: "w.yaml", trustDomain: "palisade.local") {
        for w in ws {
            // What a workload file says, written back, reads the same.
            guard let again = try? Workload.parse(w.yaml(), file: "w.yaml", trustDomain: "palisade.local"), again.count == 1,
                  again[0].ports == w.ports, again[0].labels == w.labels, again[0].addresses == w.addresses else {
                fatalError("workload \(w.name) does not survive its own yaml(): \(w.yaml())")
            }
        }
    }
    _ = try? HTTPRuleSet.load([(name: "h.yaml", text: text)])
}
