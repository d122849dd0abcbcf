import PalisadeDNS
import PalisadePolicy

/// Any bytes as a DNS message (query or answer), through glibc's parser and
/// what the proxy does with the result: the CNAME walk, the REFUSED reply
/// (which must parse again with the same ID and question).
func fuzzDNS(_ bytes: UnsafeBufferPointer<UInt8>) {
    let input = Array(bytes)
    if let m = try? DNSMessage(input) {
        let (names, addresses) = m.resolvedAddresses()
        guard names.contains(m.questionName), names.count <= m.answers.count + 1 else { fatalError("CNAME walk left the chain") }
        guard addresses.count <= m.answers.count else { fatalError("more addresses than records") }
        guard let reply = DNSMessage.reply(to: input, rcode: DNSMessage.rcodeRefused) else { fatalError("a parsed query has no REFUSED reply") }
        guard let r = try? DNSMessage(reply), r.id == m.id, r.questionName == m.questionName, r.rcode == DNSMessage.rcodeRefused, r.answers.isEmpty else {
            fatalError("the REFUSED reply does not parse back")
        }
    } else {
        _ = DNSMessage.reply(to: input, rcode: DNSMessage.rcodeServFail)
    }
    for sel in [FQDNSelector.pattern("*.example.com"), .pattern("a*b.*.test"), .name("api.example.com")] {
        _ = sel.matches(String(decoding: input.prefix(300), as: UTF8.self))
    }
}
