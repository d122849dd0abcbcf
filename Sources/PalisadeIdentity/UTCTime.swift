import Foundation

/// RFC 3339 times in UTC ("2026-11-30T09:30:00Z", or with milliseconds),
/// written and read by arithmetic. Foundation's `.iso8601` strategies and
/// ISO8601DateFormatter look up the current time zone through ICU, which
/// pages several MB of ICU data into the agent. State files, flow events
/// and logs use these instead; the text is the same, so files written
/// either way read back.
public enum UTCTime {
    public static func string(_ date: Date, milliseconds: Bool = false) -> String {
        let t = date.timeIntervalSince1970
        let seconds = Int(t.rounded(.down))
        let millis = min(999, max(0, Int((t - Double(seconds)) * 1000)))
        let days = seconds >= 0 ? seconds / 86_400 : (seconds - 86_399) / 86_400
        let ofDay = seconds - days * 86_400
        let (year, month, day) = civil(daysSince1970: days)
        return String(unsafeUninitializedCapacity: 24) { buf in
            var i = 0
            func digits(_ n: Int, _ width: Int) {
                var v = n
                for k in stride(from: width - 1, through: 0, by: -1) {
                    buf[i + k] = UInt8(ascii: "0") + UInt8(v % 10)
                    v /= 10
                }
                i += width
            }
            func char(_ c: Unicode.Scalar) { buf[i] = UInt8(ascii: c); i += 1 }
            digits(year, 4); char("-"); digits(month, 2); char("-"); digits(day, 2)
            char("T"); digits(ofDay / 3600, 2); char(":"); digits(ofDay / 60 % 60, 2); char(":"); digits(ofDay % 60, 2)
            if milliseconds { char("."); digits(millis, 3) }
            char("Z")
            return i
        }
    }

    /// "YYYY-MM-DDTHH:MM:SS[.fraction]Z"; nil for anything else.
    public static func date(_ text: String) -> Date? {
        let b = Array(text.utf8)
        guard b.count >= 20, b.last == UInt8(ascii: "Z"), b[4] == UInt8(ascii: "-"), b[7] == UInt8(ascii: "-"),
              b[10] == UInt8(ascii: "T"), b[13] == UInt8(ascii: ":"), b[16] == UInt8(ascii: ":") else { return nil }
        func number(_ from: Int, _ count: Int) -> Int? {
            var v = 0
            for c in b[from..<from + count] {
                guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") else { return nil }
                v = v * 10 + Int(c - UInt8(ascii: "0"))
            }
            return v
        }
        guard let year = number(0, 4), let month = number(5, 2), let day = number(8, 2),
              let hour = number(11, 2), let minute = number(14, 2), let second = number(17, 2),
              (1...12).contains(month), day >= 1, day <= daysIn(month: month, year: year), hour < 24, minute < 60, second < 61 else { return nil }
        var fraction = 0.0
        if b.count > 20 {
            guard b[19] == UInt8(ascii: "."), b.count > 21, let f = number(20, b.count - 21) else { return nil }
            fraction = Double(f) / pow(10, Double(b.count - 21))
        } else if b[19] != UInt8(ascii: "Z") {
            return nil
        }
        let days = daysSince1970(year: year, month: month, day: day)
        return Date(timeIntervalSince1970: Double(days * 86_400 + hour * 3600 + minute * 60 + second) + fraction)
    }

    /// The proleptic Gregorian date of a day counted from 1970-01-01,
    /// through 400-year eras (146,097 days each) that start on March 1, so
    /// the leap day ends a year.
    static func civil(daysSince1970: Int) -> (year: Int, month: Int, day: Int) {
        let z = daysSince1970 + 719_468   // days from 0000-03-01
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let monthFromMarch = (5 * dayOfYear + 2) / 153
        let day = dayOfYear - (153 * monthFromMarch + 2) / 5 + 1
        let month = monthFromMarch < 10 ? monthFromMarch + 3 : monthFromMarch - 9
        return (yearOfEra + era * 400 + (month <= 2 ? 1 : 0), month, day)
    }

    /// The inverse of `civil`.
    static func daysSince1970(year: Int, month: Int, day: Int) -> Int {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yearOfEra = y - era * 400
        let dayOfYear = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1
        let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear
        return era * 146_097 + dayOfEra - 719_468
    }

    static func daysIn(month: Int, year: Int) -> Int {
        switch month {
        case 2: return (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 ? 29 : 28
        case 4, 6, 9, 11: return 30
        default: return 31
        }
    }
}

extension JSONEncoder.DateEncodingStrategy {
    /// RFC 3339 in UTC, whole seconds (the text `.iso8601` writes), without ICU.
    public static var utc: Self {
        .custom { date, encoder in
            var c = encoder.singleValueContainer()
            try c.encode(UTCTime.string(date))
        }
    }
}

extension JSONDecoder.DateDecodingStrategy {
    /// Reads what `.utc` and `.iso8601` write (UTC, "Z"), without ICU.
    public static var utc: Self {
        .custom { decoder in
            let c = try decoder.singleValueContainer()
            let text = try c.decode(String.self)
            guard let date = UTCTime.date(text) else {
                throw DecodingError.dataCorruptedError(in: c, debugDescription: "expected an RFC 3339 UTC time such as 2026-11-30T09:30:00Z, got '\(text)'")
            }
            return date
        }
    }
}
