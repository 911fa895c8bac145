// SmtpClientSend sends one message with .NET's System.Net.Mail.SmtpClient,
// as Windows line-of-business programs do (TM Master, ERPs): AUTH LOGIN,
// EnableSsl meaning STARTTLS, the certificate checked against a CA.
// Compiled and run under mono by the bridge's interop tests:
//
//	SmtpClientSend.exe host port user password from to enableSsl attachBytes caFile subject
//
// Mono 6.8's SmtpClient offers only TLS 1.0 with EnableSsl, as .NET
// Framework 4.0-4.6 does without SchUseStrongCrypto.
using System;
using System.IO;
using System.Net;
using System.Net.Mail;
using System.Security.Cryptography.X509Certificates;

class SmtpClientSend
{
    static int Main(string[] a)
    {
        string host = a[0], user = a[2], password = a[3], from = a[4], to = a[5], caFile = a[8], subject = a[9];
        int port = int.Parse(a[1]), attach = int.Parse(a[7]);
        bool ssl = a[6] == "1";
        if (ssl)
        {
            // The test CA is trusted for this client only, as certutil
            // -addstore Root would trust it on Windows.
            var ca = new X509Certificate2(caFile);
            ServicePointManager.ServerCertificateValidationCallback = (sender, cert, chain, errors) =>
            {
                var c = new X509Chain();
                c.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
                c.ChainPolicy.VerificationFlags = X509VerificationFlags.AllowUnknownCertificateAuthority;
                c.ChainPolicy.ExtraStore.Add(ca);
                if (!c.Build(new X509Certificate2(cert)))
                    return false;
                return c.ChainElements[c.ChainElements.Count - 1].Certificate.Thumbprint == ca.Thumbprint;
            };
        }
        var client = new SmtpClient(host, port);
        client.EnableSsl = ssl;
        client.DeliveryMethod = SmtpDeliveryMethod.Network;
        client.Credentials = new NetworkCredential(user, password);
        var msg = new MailMessage(from, to, subject, "Body written by System.Net.Mail.");
        if (attach > 0)
        {
            var data = new byte[attach];
            for (int i = 0; i < attach; i++)
                data[i] = (byte)(i * 7 + 3);
            msg.Attachments.Add(new Attachment(new MemoryStream(data), "report.bin", "application/octet-stream"));
        }
        try
        {
            client.Send(msg);
        }
        catch (Exception e)
        {
            Console.WriteLine("failed: " + e);
            return 1;
        }
        Console.WriteLine("sent");
        return 0;
    }
}
